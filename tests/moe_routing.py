"""Mixtral's router recorded and held, and the KL divergence of two runs: how a logit gap between
two runs of one MoE model is traced to routing (tests/test_gptq_awq.py, bench/gptqmodel_moe_parity.py)."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

import torch


def kld(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean KL(p || q) over positions, from logits."""
    return float(torch.nn.functional.kl_div(torch.log_softmax(q.double(), -1), torch.log_softmax(p.double(), -1),
                                            log_target=True, reduction="none").sum(-1).mean())


class Routing:
    """Top-k experts of every router call in order (`take()` hands them over and starts afresh);
    after `hold(routes)` the calls use those experts instead, weighted by the router's own
    probabilities renormalized over them."""

    def __init__(self) -> None:
        self.routes: list[torch.Tensor] = []
        self.forced: list[torch.Tensor] = []

    def take(self) -> list[torch.Tensor]:
        routes, self.routes = self.routes, []
        return routes

    def hold(self, routes: list[torch.Tensor]) -> None:
        self.forced = list(routes)

    @staticmethod
    def rerouted(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
        """Per router call, the share of tokens whose expert set differs."""
        return [float((x.sort(-1).values != y.sort(-1).values).any(-1).float().mean()) for x, y in zip(a, b)]


@contextmanager
def mixtral_routing() -> Iterator[Routing]:
    """Within: transformers' MixtralTopKRouter records (or holds) its choices."""
    from transformers.models.mixtral import modeling_mixtral as mm

    r, route = Routing(), mm.MixtralTopKRouter.forward

    def router(self, h):
        logits, scores, idx = route(self, h)
        if r.forced:
            idx = r.forced.pop(0)
            top = torch.softmax(logits.float(), -1).gather(1, idx)
            scores = top / top.sum(-1, keepdim=True)
        else:
            r.routes.append(idx)
        return logits, scores, idx

    mm.MixtralTopKRouter.forward = router
    try:
        yield r
    finally:
        mm.MixtralTopKRouter.forward = route

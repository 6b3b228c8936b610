"""The reference model run one decoder layer at a time, over all verify windows at once.

The way the GPTQ engine runs a model, so verify fits where the model does not: embeddings of
every window, then each decoder layer read from the mapped checkpoint (through the canonical
form: TeleChat without a temporary copy), applied to all windows and freed before the next;
then the final norm and lm_head give one window's logits at a time. Held at once: one layer,
the windows' hidden states and one window's logits, whatever the number of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..device import resolve_device
from ..model.canonical import CanonicalModel
from ..quantize.engine import build_layer, checked, hf_config_object, transformers_class

# --reference auto streams a torch-run model above this many bytes of float32 weights (~250M parameters):
# below it the whole-model forward is as fast and its memory does not matter
STREAM_ABOVE_BYTES = 1 << 30


def streams(model: CanonicalModel, reference: str) -> bool:
    """Whether --reference `reference` runs `model` layer by layer (auto: above STREAM_ABOVE_BYTES of float32)."""
    return reference == "streamed" or (reference == "auto" and 4 * model.n_params() > STREAM_ABOVE_BYTES)


class StreamedRunner:
    """A canonical model's logits, computed layer by layer in float32 on cpu or cuda."""

    kind = "transformers, layer by layer"

    def __init__(self, model: CanonicalModel, device: str = "auto", batch: int = 4, what: str = "transformers"):
        self.model, self.device, self.batch = model, resolve_device(device), batch
        self.config = hf_config_object(model)
        self.by_name = {t.name: t for t in model.tensors}
        self.vocab_size = model.vocab_size
        self.n_ctx = int(model.config.get("max_position_embeddings", 2048))
        self.label = f"{what}, layer by layer ({self.device}, f32)"

    @torch.no_grad()
    def iter_logits(self, windows: list[list[int]],
                    on_layer: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """Logits [len(w), vocab] of each window, in order, after one pass over the layers."""
        dev = self.device
        emb = checked(self.by_name["model.embed_tokens.weight"])
        hidden = [emb[torch.tensor(w)].unsqueeze(0).to(dev) for w in windows]
        del emb
        rot = transformers_class(self.model, self.model.spec.rotary)(self.config).to(dev)
        lengths = sorted({len(w) for w in windows})
        pos = {n: rot(hidden[0], torch.arange(n, device=dev).unsqueeze(0)) for n in lengths}
        groups = {n: [i for i, w in enumerate(windows) if len(w) == n] for n in lengths}
        for i in range(self.model.n_layers):
            layer = build_layer(self.model, self.config, self.by_name, i, dev)
            for n, members in groups.items():  # windows of one length run as batches
                for b in range(0, len(members), self.batch):
                    idx = members[b : b + self.batch]
                    x = torch.cat([hidden[j] for j in idx])
                    out = layer(x, position_embeddings=pos[n], attention_mask=None)
                    out = out[0] if isinstance(out, tuple) else out
                    for k, j in enumerate(idx):
                        hidden[j] = out[k : k + 1]
            del layer
            if on_layer:
                on_layer(i)
        norm = transformers_class(self.model, self.model.spec.norm)(self.model.hidden,
                                                                     eps=float(self.model.config["rms_norm_eps"]))
        norm.weight.data = checked(self.by_name["model.norm.weight"])
        norm = norm.to(dev)
        head = checked(self.by_name["model.embed_tokens.weight" if self.model.tied else "lm_head.weight"]).to(dev)
        for j in range(len(windows)):
            h = norm(hidden[j][0])
            hidden[j] = None  # each window's state goes as its logits are made
            yield (h @ head.t()).float().cpu().numpy()

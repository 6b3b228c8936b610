"""GPTQModel's GPTQ on the same model and calibration windows as bench_gptq.py (run in its own venv).

    bench/out/gq-venv/bin/python bench/gptqmodel_quantize.py SRC OUT CALIB_IDS.pt

Prints the wall time of load + quantize + save.
"""

from __future__ import annotations

import sys
import time

import torch


def main() -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    src, out, ids_file = sys.argv[1:4]
    ids = torch.load(ids_file)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.shape[0]} for row in ids]
    t0 = time.perf_counter()
    model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=128, desc_act=False, sym=True), device="cpu")
    model.quantize(calib, batch_size=1)
    model.save(out)
    print(f"GPTQMODEL_SECONDS {time.perf_counter() - t0:.1f}")


if __name__ == "__main__":
    main()

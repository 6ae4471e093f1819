"""CNN training steps on CPU, fp32 against bf16 autocast: what conf/model/{resnet,efficientnet}.yaml default to on a
CPU. One step = forward, cross-entropy on a mean-pooled linear head, backward, AdamW; median of --repeats after one
warm-up, images/s per backbone at the configs' 64x64 grey inputs.

    .venv/bin/python benchmarks/cnn_precision.py [--threads 2] [--repeats 5] [--batch 64]

Writes experiments/benchmarks/cnn_precision.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fmlab.models.backbone import build_backbone

OUT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "cnn_precision.json"
SIZES = ("resnet18", "efficientnet_lite0")


def images_per_second(size: str, bf16: bool, batch: int, img: int, repeats: int) -> float:
    torch.manual_seed(0)
    model = build_backbone({"_target_": "fmlab.models.cnn.CNNConfig", "size": size, "in_chans": 1, "img_size": img})
    head = torch.nn.Linear(model.width, 10)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()])
    x, y = torch.randn(batch, 1, img, img), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(head(model.encode(x).mean(dim=1)), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--img-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for size in SIZES:
        fp32 = images_per_second(size, False, args.batch, args.img_size, args.repeats)
        bf16 = images_per_second(size, True, args.batch, args.img_size, args.repeats)
        rows[size] = {"fp32 images/s": round(fp32, 1), "bf16 images/s": round(bf16, 1),
                      "bf16 / fp32": round(bf16 / fp32, 2)}
        print(size, rows[size], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"threads": args.threads, "batch": args.batch, "img_size": args.img_size,
                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()

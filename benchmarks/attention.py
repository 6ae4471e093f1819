"""Attention on CPU: PyTorch's SDPA (flash kernel) against fmlab's `explicit_attention` (two batched matmuls),
forward + backward of one layer at the benchmark workloads' shapes, fp32 and bf16 (autocast), median of --repeats.

    .venv/bin/python benchmarks/attention.py [--threads 2] [--repeats 12]

Writes experiments/benchmarks/attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fmlab.models.transformer import explicit_attention

OUT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "attention.json"
SHAPES = {  # name: (batch, heads, T, head size, causal)
    "GPT 6 x 384, block 256, batch 8": (8, 6, 256, 64, True),
    "BERT 6 x 384, block 128, batch 16": (16, 6, 128, 64, False),
    "MAE encoder, 12 + 1 visible tokens, batch 128": (128, 4, 13, 16, False),
}


def seconds(fn, shape: tuple, dtype: torch.dtype, repeats: int) -> float:
    B, H, T, D, _ = shape
    # Strided views of one (B, T, 3, H, D) tensor, as the fused qkv projection makes them.
    qkv = torch.randn(B, T, 3, H, D).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = fn(q, k, v)
        y.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, shape in SHAPES.items():
        causal = shape[4]
        for dtype in (torch.float32, torch.bfloat16):
            sdpa = seconds(lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c), shape, dtype,
                           args.repeats)
            ours = seconds(lambda q, k, v, c=causal: explicit_attention(q, k, v, c, 0.0), shape, dtype, args.repeats)
            rows.append({"shape": name, "dtype": str(dtype).removeprefix("torch."), "sdpa_ms": sdpa * 1000,
                         "explicit_ms": ours * 1000})
            print(f"{name:48s} {rows[-1]['dtype']:9s} SDPA {sdpa * 1000:6.1f} ms  explicit {ours * 1000:6.1f} ms")
    OUT.write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""GPT-2 124M training throughput and MFU on one NVIDIA GPU, bf16 autocast, with and without torch.compile.

    bash benchmarks/gpu.sh            # both variants, about 3 minutes on an H100-class GPU

Random tokens (the step cost does not depend on them); AdamW (fused), gradient clipping, micro-batch 16 x 1024.
MFU = achieved model FLOP/s / dense bf16 peak of the device, model FLOPs per token = 6 N + 12 L T C
(PaLM appendix B; N without position embeddings). Prints one line per variant and writes
experiments/benchmarks/gpu-gpt2.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fmlab.models.gpt import GPTConfig

# Dense (not sparse) peak TFLOP/s in bf16, by device-name fragment.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "4090": 165.0}


def peak_flops(name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def measure(compile_model: bool, batch: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, activation="gelu_tanh")
    model = cfg.build().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * cfg.block_size
    flops_per_token = 6 * model.num_params() + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd
    peak = peak_flops(torch.cuda.get_device_name())
    achieved = flops_per_token * tokens / seconds
    return {
        "compile": compile_model, "ms_per_step": seconds * 1000, "tokens_per_s": tokens / seconds,
        "model_tflops": achieved / 1e12, "mfu": achieved / peak if peak else None, "warmup_s": warm_s,
        "params": model.num_params(), "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    rows = []
    for compile_model in (False, True):
        row = measure(compile_model, args.batch, args.steps, args.warmup)
        rows.append(row)
        mfu = f"{row['mfu'] * 100:.1f}%" if row["mfu"] is not None else "n/a (unknown peak)"
        print(
            f"{device} compile={compile_model}: {row['ms_per_step']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, "
            f"{row['model_tflops']:.0f} TFLOP/s, MFU {mfu}, peak mem {row['peak_gb']:.1f} GB", flush=True,
        )
        torch.cuda.empty_cache()
    out = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "gpu-gpt2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()

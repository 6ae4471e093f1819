#!/usr/bin/env bash
# GPT-2 124M on one NVIDIA GPU: bf16 tokens/s and MFU, eager and torch.compile. About 3 minutes.
# Needs a CUDA build of torch in .venv (make setup installs one on x86_64) and a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 300 .venv/bin/python benchmarks/gpu_gpt2.py "$@"

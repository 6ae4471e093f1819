"""Time to the first error: how long `python train.py <bad option>` takes to print its `error:` line, against the
interpreter importing what train.py imports. A user error should cost the imports plus well under a second.

    python benchmarks/first_error.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "missing data.source": ["data=text_files", "data.source=/no/such/corpus"],
    "image model, text data": ["model=vit", "data=bbc_news"],
    "missing pretrained": ["model=bert", "stage=finetune", "pretrained=/no/such.ckpt"],
    "unknown option": ["trainer.bogus=1"],
}


def seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {"imports": statistics.median(
        seconds([sys.executable, "-c", "import hydra, fmlab.training, fmlab.cli"]) for _ in range(args.repeats))}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={tmp}/run", "logger=csv"]
            results[name] = statistics.median(seconds(cmd) for _ in range(args.repeats))
    for name, value in results.items():
        extra = "" if name == "imports" else f"  (imports + {value - results['imports']:.2f} s)"
        print(f"{name:24s} {value:6.2f} s{extra}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

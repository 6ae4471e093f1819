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


# Imports what train.py imports, then runs it in the same process and prints the seconds from the end of the
# imports to the exit: the cost of reaching the error, apart from the interpreter's import time.
AFTER_IMPORTS = """
import runpy, sys, time
import fmlab.training, fmlab.cli
start = time.perf_counter()
sys.argv = ["train.py", *sys.argv[1:]]
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit:
    pass
print(f"AFTER_IMPORTS {time.perf_counter() - start:.4f}", file=sys.stderr)
"""


def seconds(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    return time.perf_counter() - start


def after_imports(overrides: list[str]) -> float:
    done = subprocess.run([sys.executable, "-c", AFTER_IMPORTS, *overrides], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    return float(next(line for line in done.stderr.splitlines() if line.startswith("AFTER_IMPORTS")).split()[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in CASES.items():
            argv = [*overrides, f"hydra.run.dir={tmp}/run", "logger=csv"]
            results[name] = {
                "wall_s": statistics.median(seconds([sys.executable, "train.py", *argv]) for _ in range(args.repeats)),
                "after_imports_s": statistics.median(after_imports(argv) for _ in range(args.repeats)),
            }
    for name, r in results.items():
        print(f"{name:24s} {r['wall_s']:6.2f} s wall, {r['after_imports_s']:5.2f} s after the imports")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

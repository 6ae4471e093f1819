"""Start-up time: from the command to the first training step, and to the first user error.

    .venv/bin/python benchmarks/startup.py [--repeats 3] [--tag startup]

Each case runs `python train.py ...` in a fresh process: the seconds from starting the process to the first
training batch (a probe callback prints the wall clock there and stops the run), and to the exit of a run that fails
on a bad option (`model=nope`). The first run tokenizes the corpus into the cache; it is not timed. Also reports
which of the heavy optional packages (wandb, transformers, tensorboard, optuna...) the run had imported by its first
step. Writes experiments/benchmarks/<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "benchmarks"
OPTIONAL = ("wandb", "transformers", "torchvision", "tensorboard", "optuna", "matplotlib", "pandas", "datasets",
            "huggingface_hub", "safetensors", "rich", "torch._dynamo")
PROBE = "+callbacks.first_step._target_=startup.FirstStep"


class FirstStep(L.Callback):
    """Prints the wall clock and the loaded optional packages at the first training batch, then stops the run."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loaded = sorted(name for name in OPTIONAL if name in sys.modules)
        print(f"FIRST_STEP {time.time():.4f} {','.join(loaded)}", file=sys.stderr, flush=True)
        os._exit(0)  # the measurement ends here: no checkpoint, no W&B sync


CASES = {
    # The default run (GPT mini on BBC News): validation before the first step, as shipped.
    "first step: train.py": [],
    "first step: train.py validate_before_fit=false": ["validate_before_fit=false"],
    "first step: train.py logger=csv validate_before_fit=false": ["logger=csv", "validate_before_fit=false"],
}
ERRORS = {
    "first error: train.py model=nope": ["model=nope"],
    "first error: train.py data.source=/no/such (text_files)": ["data=text_files", "data.source=/no/such/corpus"],
}


def run(argv: list[str], run_dir: str) -> tuple[float, str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.time()
    done = subprocess.run([sys.executable, "train.py", *argv, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    end = time.time()
    line = next((x for x in done.stderr.splitlines() if x.startswith("FIRST_STEP")), None)
    if line is None:
        return end - start, "", done.stderr[-2000:] + done.stdout[-500:]
    parts = line.split()
    return float(parts[1]) - start, parts[2] if len(parts) > 2 else "", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tag", default="startup")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run([PROBE, "validate_before_fit=false", "logger=csv"], f"{tmp}/warm")  # fills the token cache
        for name, overrides in {**CASES, **ERRORS}.items():
            probe = [PROBE] if name in CASES else []
            times, loaded, error = [], "", ""
            for i in range(args.repeats):
                seconds, loaded, error = run([*overrides, *probe], f"{tmp}/{len(results)}-{i}")
                times.append(seconds)
            if name in CASES and error:
                raise SystemExit(f"{name}: no first step:\n{error}")
            results[name] = {"median_s": statistics.median(times), "min_s": min(times), "runs_s": times}
            if name in CASES:
                results[name]["optional_imports_at_first_step"] = loaded.split(",") if loaded else []
    for module in ("torch", "lightning", "fmlab.training"):  # what the heavy imports are, in a fresh process each
        times = []
        for _ in range(args.repeats):
            done = subprocess.run([sys.executable, "-c", f"import time; t = time.time(); import {module}; "
                                   "print(time.time() - t)"], cwd=ROOT, capture_output=True, text=True, check=True)
            times.append(float(done.stdout.split()[-1]))
        results[f"import {module}"] = {"median_s": statistics.median(times), "runs_s": times}
    for name, r in results.items():
        extra = f"  loaded: {', '.join(r['optional_imports_at_first_step'])}" if "optional_imports_at_first_step" in r \
            else ""
        print(f"{name:58s} {r['median_s']:6.2f} s{extra}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.tag}.json").write_text(json.dumps({"repeats": args.repeats, "load": os.getloadavg(),
                                                      "results": results}, indent=2))


if __name__ == "__main__":
    main()

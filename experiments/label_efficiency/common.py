"""What the label-efficiency experiments share: run train.py, keep results, draw the table and the plot."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def sample_std(values: np.ndarray) -> float:
    """The sample standard deviation over seeds (ddof=1; numpy's default ddof=0 understates it, 1.22x at n=3)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def parser(doc: str, fractions: list[float], pretrain_steps: int, finetune_steps: int) -> argparse.ArgumentParser:
    """The options both drivers take; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=float, nargs="+", default=fractions)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-steps", type=int, default=pretrain_steps)
    p.add_argument("--finetune-steps", type=int, default=finetune_steps)
    p.add_argument("--jobs", type=int, default=1, help="fine-tunes run side by side, one intra-op thread each")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every run")
    p.add_argument("--report-only", action="store_true")
    return p


def train(runs: Path, name: str, overrides: list[str], threads: int | None = None) -> Path:
    """Run train.py into <runs>/<name> (with `threads` intra-op threads if given); returns the run folder."""
    run_dir = runs / name
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, "logger=csv", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def report(results: dict, arms: list[str], stem: str, title: str, xlabel: str) -> None:
    """Markdown table (mean ± std over seeds) and an accuracy-vs-labels plot of whatever has finished."""
    rows: dict[tuple[str, float], list[dict]] = {}
    for run in results["runs"].values():
        rows.setdefault((run["arm"], run["fraction"]), []).append(run)
    fractions = sorted({f for _, f in rows})
    lines = ["| labels | " + " | ".join(f"{arm}: acc / F1" for arm in arms) + " |", "|---|" + "---|" * len(arms)]
    for f in fractions:
        cells = []
        for arm in arms:
            runs = rows.get((arm, f), [])
            acc = np.array([r["test/acc"] for r in runs]) * 100
            f1 = np.array([r["test/f1"] for r in runs]) * 100
            cells.append(f"{acc.mean():.1f} ± {sample_std(acc):.1f} / {f1.mean():.1f} (n={len(runs)})" if runs else "–")
        lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
    (HERE / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        xs = [f for f in fractions if rows.get((arm, f))]
        if xs:
            accs = [np.array([r["test/acc"] for r in rows[(arm, f)]]) * 100 for f in xs]
            ax.errorbar(xs, [a.mean() for a in accs], yerr=[sample_std(a) for a in accs], marker="o", capsize=3,
                        label=arm)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / f"{stem}.png", dpi=120)
    plt.close(fig)


def sweep(
    results_path: Path, runs: Path, arms: list[str], fractions: list[float], seeds: list[int],
    overrides: Callable[[str, float, int], list[str]], on_result: Callable[[dict], None], jobs: int = 1,
) -> None:
    """Fine-tune every arm x fraction x seed not yet in `results_path`, `jobs` at a time (one core each),
    saving after each run."""
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": {}}
    pending = [(arm, fraction, seed) for fraction in fractions for seed in seeds for arm in arms
               if f"{arm}-f{fraction:g}-s{seed}" not in results["runs"]]
    lock = threading.Lock()

    def run(arm: str, fraction: float, seed: int) -> None:
        name = f"{arm}-f{fraction:g}-s{seed}"
        start = time.perf_counter()
        run_dir = train(runs, name, overrides(arm, fraction, seed), threads=1 if jobs > 1 else None)
        metrics = json.loads((run_dir / "test_metrics.json").read_text())["metrics"]
        with lock:
            results["runs"][name] = {
                "arm": arm, "fraction": fraction, "seed": seed, "seconds": round(time.perf_counter() - start),
                "test/acc": metrics["test/acc"], "test/f1": metrics["test/f1"],
            }
            results_path.write_text(json.dumps(results, indent=2))
            on_result(results)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(run, *job) for job in pending]:
            future.result()  # a failed run stops the sweep with its error; finished ones are saved

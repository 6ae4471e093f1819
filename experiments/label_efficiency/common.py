"""What the label-efficiency experiments share: the protocol (epoch budgets with early stopping, a learning-rate grid
chosen on the validation split, seeds that redraw the few labels), run train.py, keep every result, draw the tables
and the plot with the classic baseline beside the fmlab arms."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLASSIC = HERE / "results_classic.json"
# the hyperparameters a grid point may set, as train.py overrides
HPARAMS = {"lr": "task.optimizer.lr", "layer_decay": "task.layer_decay"}
# the BBC News split (train / val / test) the text arms and TF-IDF share, fixed across seeds
TEXT_SPLIT_SEED = 1234


def sample_std(values: np.ndarray) -> float:
    """The sample standard deviation over seeds (ddof=1; numpy's default ddof=0 understates it, 1.22x at n=3)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def spread(values: np.ndarray) -> str:
    """Mean ± the sample standard deviation over seeds (the mean alone for one run)."""
    return f"{values.mean():.1f} ± {sample_std(values):.1f}" if len(values) > 1 else f"{values.mean():.1f}"


def label_overrides(labels: str) -> list[str]:
    """'1%' -> data.label_fraction=0.01, '16/class' -> data.labels_per_class=16, '100%' -> nothing."""
    if labels.endswith("/class"):
        return [f"data.labels_per_class={int(labels.removesuffix('/class'))}"]
    if not labels.endswith("%"):
        raise ValueError(labels)
    fraction = float(labels.removesuffix("%")) / 100
    return [] if fraction == 1 else [f"data.label_fraction={fraction:g}"]


def label_budget(labels: str) -> str:
    """An argparse type: a label budget as the drivers name it ('1%', '16/class'), checked."""
    try:
        label_overrides(labels)
    except ValueError:
        message = f"{labels!r}: a label budget is a percentage (1%) or k per class (16/class)"
        raise argparse.ArgumentTypeError(message) from None
    return labels


def hp_tag(hp: dict) -> str:
    """A grid point as part of a run name: lr0.002-ldnone."""
    short = {"lr": "lr", "layer_decay": "ld"}
    return "-".join(f"{short[k]}{'none' if v is None else f'{v:g}'}" for k, v in hp.items())


def hp_overrides(hp: dict) -> list[str]:
    return [f"{HPARAMS[k]}={'null' if v is None else v}" for k, v in hp.items()]


def parser(doc: str, labels: list[str], seeds_all_labels: list[int]) -> argparse.ArgumentParser:
    """The options both drivers take; each adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", nargs="+", type=label_budget, default=labels,
                   help="label budgets: 1%% (a fraction) or 16/class")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the first also chooses the grid point")
    p.add_argument("--seeds-all-labels", type=int, nargs="+", default=seeds_all_labels,
                   help="seeds at 100%% (every seed trains on the same labels there)")
    p.add_argument("--max-epochs", type=int, default=100,
                   help="the cap, in validation rounds (an epoch, or the fewest epochs of 20 steps at few labels); "
                        "the cosine schedule spans it")
    p.add_argument("--patience", type=int, default=10,
                   help="validation rounds without a better validation loss before stopping")
    p.add_argument("--arms", nargs="+", default=None, help="a subset of the arms (default: all)")
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


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def last_step(rows: list[dict[str, str]]) -> int:
    """Optimizer steps taken by the last validation (its row logs the 0-based index of the step it follows)."""
    return max(int(r["step"]) for r in rows if r.get("val/loss")) + 1


def run_summary(run_dir: Path, max_epochs: int) -> dict:
    """What a fine-tune used and how it ended, from its CSV log: the optimizer steps and epochs it ran, the epochs in
    a validation round (fmlab/callbacks/validation_rounds.py), the epoch of its best validation loss (the checkpoint
    tested), and whether early stopping or the cap (`max_epochs` rounds) ended it."""
    rows = csv_rows(run_dir)
    val = [(int(r["epoch"]), float(r["val/loss"])) for r in rows if r.get("val/loss")]
    steps = last_step(rows)
    epochs = max(e for e, _ in val) + 1
    validated = sorted({e for e, _ in val})
    per_round = validated[-1] - validated[-2] if len(validated) > 1 else validated[-1] + 1
    best_epoch, best_loss = min(val, key=lambda v: v[1])
    return {"steps": steps, "epochs": epochs, "epochs_per_round": per_round, "best_epoch": best_epoch + 1,
            "val/loss": best_loss, "stopped": "cap" if epochs >= max_epochs * per_round else "early"}


def pretrain_summary(run_dir: Path) -> dict:
    """A pre-training run's steps, last validation metrics and wall time (from its log's first and last lines)."""
    rows = csv_rows(run_dir)
    last = {k: float(v) for r in rows if r.get("val/loss") for k, v in r.items() if k.startswith("val/") and v}
    stamps = [line[1:24] for line in (run_dir / "train.log").read_text().splitlines() if line.startswith("[20")]
    start, end = (time.mktime(time.strptime(s[:19], "%Y-%m-%d %H:%M:%S")) for s in (stamps[0], stamps[-1]))
    return {"steps": last_step(rows), **last, "minutes": round((end - start) / 60, 1)}


def record_result(path: Path, results: dict, section: str, key: str | None, value: object) -> dict:
    """Write `results[section][key] = value` (`results[section] = value` when key is None) into the JSON file at
    path, re-read just before: two drivers (e.g. one per arm) can share the file without either overwriting what the
    other wrote with a stale copy. Returns what is now on disk, which the caller keeps as its results."""
    on_disk = json.loads(path.read_text()) if path.is_file() else {}
    for name, kept in results.items():  # what only this driver holds fills gaps; the file wins where both have it
        on_disk[name] = {**kept, **on_disk.get(name, {})} if isinstance(kept, dict) else on_disk.get(name, kept)
    if key is None:
        on_disk[section] = value
    else:
        on_disk[section] = {**on_disk.get(section, {}), key: value}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(on_disk, indent=2))
    tmp.replace(path)
    return on_disk


class Study:
    """One modality's runs: every arm x label budget x seed, the grid searched at the first seed (the point with
    the lowest best validation loss is kept, and the other seeds train with it), saved after each run."""

    def __init__(self, path: Path, runs: Path, arms: dict[str, list[dict]],
                 overrides: Callable[[str, str, int, dict], list[str]], args: argparse.Namespace) -> None:
        self.path, self.runs, self.overrides, self.args = path, runs, overrides, args
        if unknown := set(args.arms or []) - set(arms):
            sys.exit(f"error: --arms: no arm {', '.join(sorted(unknown))}; the arms are {', '.join(arms)}")
        self.arms = {a: g for a, g in arms.items() if args.arms is None or a in args.arms}
        self.results = json.loads(path.read_text()) if path.is_file() else {"pretrain": {}, "runs": {}}
        self.results.setdefault("pretrain", {})
        self.lock = threading.Lock()

    def record(self, section: str, key: str, value: dict) -> None:
        """Store one result (a run or a pre-training summary) in the results file."""
        with self.lock:
            self.results = record_result(self.path, self.results, section, key, value)

    def fine_tune(self, arm: str, labels: str, seed: int, hp: dict) -> dict:
        name = f"{arm}-{labels.replace('/', 'per').replace('%', 'pct')}-s{seed}-{hp_tag(hp)}"
        if name in self.results["runs"]:
            return self.results["runs"][name]
        budget = [f"trainer.max_epochs={self.args.max_epochs}",
                  f"callbacks.early_stopping.patience={self.args.patience}"]
        overrides = [*self.overrides(arm, labels, seed, hp), *label_overrides(labels), *hp_overrides(hp), *budget,
                     *self.args.extra]
        start = time.perf_counter()
        run_dir = train(self.runs, name, overrides, threads=1 if self.args.jobs > 1 else None)
        metrics = json.loads((run_dir / "test_metrics.json").read_text())["metrics"]
        run = {"arm": arm, "labels": labels, "seed": seed, "hp": hp,
               "minutes": round((time.perf_counter() - start) / 60, 2), **run_summary(run_dir, self.args.max_epochs),
               "test/acc": metrics["test/acc"], "test/f1": metrics["test/f1"]}
        self.record("runs", name, run)
        return run

    def chosen(self, arm: str, labels: str) -> dict | None:
        """The grid point kept for (arm, labels): the lowest best validation loss at the first seed."""
        seed = self.seeds(labels)[0]
        runs = [r for r in self.results["runs"].values() if (r["arm"], r["labels"], r["seed"]) == (arm, labels, seed)
                and r["hp"] in self.arms[arm]]
        if not runs:
            return None
        return min(runs, key=lambda r: r["val/loss"] if math.isfinite(r["val/loss"]) else math.inf)["hp"]

    def seeds(self, labels: str) -> list[int]:
        return self.args.seeds_all_labels if labels == "100%" else self.args.seeds

    def run(self, grid_from: dict[str, str] | None = None) -> None:
        """Every label budget in order: the grid at the first seed for every arm, then the other seeds. A budget in
        `grid_from` reuses the point chosen at another budget instead of searching its own grid, so all its seeds
        train at once."""
        grid_from = grid_from or {}
        with ThreadPoolExecutor(max_workers=self.args.jobs) as pool:
            for labels in self.args.labels:
                seeds = self.seeds(labels)
                if source := grid_from.get(labels):  # no grid to wait for: every seed at once
                    jobs = [(arm, labels, seed, self.chosen(arm, source)) for arm in self.arms for seed in seeds]
                    list(pool.map(lambda job: self.fine_tune(*job), [job for job in jobs if job[3] is not None]))
                    continue
                jobs = [(arm, labels, seeds[0], hp) for arm, grid in self.arms.items() for hp in grid]
                list(pool.map(lambda job: self.fine_tune(*job), jobs))
                jobs = [(arm, labels, seed, self.chosen(arm, labels)) for arm in self.arms for seed in seeds[1:]]
                list(pool.map(lambda job: self.fine_tune(*job), jobs))

    def table_runs(self) -> dict[tuple[str, str], list[dict]]:
        """The runs each table cell averages: every seed at the chosen grid point."""
        cells: dict[tuple[str, str], list[dict]] = {}
        for arm in self.arms:
            for labels in self.args.labels:
                hp = self.chosen(arm, labels)
                cells[(arm, labels)] = [r for r in self.results["runs"].values()
                                        if (r["arm"], r["labels"], r["hp"]) == (arm, labels, hp)]
        return cells


def classic_runs(modality: str) -> dict[str, list[dict]]:
    """The classic baseline's runs per label budget (classic.py), on the same samples as the fmlab arms."""
    results = json.loads(CLASSIC.read_text()) if CLASSIC.is_file() else {}
    out: dict[str, list[dict]] = {}
    for key, run in results.items():
        name, labels, _ = key.split("-")
        if name == modality:
            out.setdefault(labels, []).append(run)
    return out


PLAIN_EPOCHS = "†"


def how_stopped(runs: list[dict]) -> str:
    """"early" or "cap" where every seed stopped alike, else the count of each ("2 early, 1 cap")."""
    counts = sorted(Counter(r["stopped"] for r in runs).items(), reverse=True)
    return counts[0][0] if len(counts) == 1 else ", ".join(f"{n} {how}" for how, n in counts)


def plain_epochs(runs: list[dict]) -> str:
    """A mark for a cell with runs from before validation rounds (their records lack `epochs_per_round`)."""
    return f" {PLAIN_EPOCHS}" if any("epochs_per_round" not in r for r in runs) else ""


def report(study: Study, modality: str, baseline: str, stem: str, title: str) -> str:
    """Accuracy and macro F1 tables (mean ± sample std over seeds) with the classic baseline as the first column,
    a cost table (minutes, epochs, how each run stopped, the chosen grid point), and accuracy vs labels as a PNG."""
    cells, classic = study.table_runs(), classic_runs(modality)
    sizes = {b: classic[b][0]["sizes"] for b in study.args.labels if b in classic}
    arms = list(study.arms)
    budgets = sorted(study.args.labels, key=lambda b: sizes[b]["train"] if b in sizes else math.inf)
    out = []
    for metric, name in (("test/acc", "test accuracy"), ("test/f1", "test macro F1")):
        out += [f"**{name} (%)**", "", f"| labels | train / val examples | {baseline} | " + " | ".join(arms) + " |",
                "|---|---|---|" + "---|" * len(arms)]
        for b in budgets:
            row = [spread(np.array([r[metric] for r in runs]) * 100) + f" (n={len(runs)}){plain_epochs(runs)}"
                   if (runs := cells[(a, b)]) else "–" for a in arms]
            base = classic.get(b)
            base_cell = spread(np.array([r[metric] for r in base]) * 100) + f" (n={len(base)})" if base else "–"
            size = f"{sizes[b]['train']} / {sizes[b]['val']}" if b in sizes else "?"
            out.append(f"| {b} | {size} | {base_cell} | " + " | ".join(row) + " |")
        out.append("")
    out += ["**cost per run (mean over seeds): minutes (wall, one core), optimizer steps, epochs run (best epoch), "
            "epochs per validation round (where more than one), stopped by early stopping or the cap, the grid point "
            "chosen at the first seed**", "",
            "| labels | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for b in budgets:
        row = []
        for a in arms:
            runs = cells[(a, b)]
            if not runs:
                row.append("–")
                continue
            stops = how_stopped(runs)
            mean = {k: np.mean([r[k] for r in runs]) for k in ("minutes", "steps", "epochs", "best_epoch")}
            per_round = sorted({r.get("epochs_per_round", 1) for r in runs})
            rounds = f" in rounds of {'/'.join(map(str, per_round))}" if per_round != [1] else ""
            row.append(f"{mean['minutes']:.1f} min, {mean['steps']:.0f} steps, {mean['epochs']:.0f} "
                       f"({mean['best_epoch']:.0f}) ep{rounds}, {stops}, {hp_tag(runs[0]['hp'])}")
        out.append(f"| {b} | " + " | ".join(row) + " |")
    grid_minutes = sum(r["minutes"] for r in study.results["runs"].values())
    out += ["", f"All {len(study.results['runs'])} fine-tunes, grid points included: {grid_minutes:.0f} core-minutes."]
    if any(plain_epochs(runs) for runs in cells.values()):
        out += ["", f"{PLAIN_EPOCHS} counted in plain epochs: run before validation rounds were the default, with "
                "fewer than 20 steps an epoch (fmlab/callbacks/validation_rounds.py)."]
    text = "\n".join(out) + "\n"
    (HERE / f"{stem}.md").write_text(text)
    plot(cells, classic, sizes, arms, budgets, baseline, HERE / f"{stem}.png", title)
    return text


def plot(cells: dict, classic: dict, sizes: dict, arms: list[str], budgets: list[str], baseline: str, path: Path,
         title: str) -> None:
    """Test accuracy against the number of training labels, one line per arm, the classic baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs_all = sorted((sizes[b]["train"], b) for b in budgets if b in sizes)

    def line(runs_per_budget: dict[str, list[dict]], **style) -> None:
        points = [(x, np.array([r["test/acc"] for r in runs_per_budget[b]]) * 100)
                  for x, b in xs_all if runs_per_budget.get(b)]
        if points:
            ax.errorbar([p[0] for p in points], [p[1].mean() for p in points], yerr=[sample_std(p[1]) for p in points],
                        marker="o", capsize=3, **style)

    line(classic, label=baseline, linestyle="--", color="black")
    for arm in arms:
        line({b: cells[(arm, b)] for b in budgets}, label=arm)
    ax.set_xscale("log")
    ax.set_xlabel("training labels")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

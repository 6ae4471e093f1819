"""Vision backbones at few labels on Fashion-MNIST: ImageNet weights vs contrastive vs MAE pre-training vs scratch.

    .venv/bin/python experiments/vision_backbones/run.py [--fractions 0.01 0.1] [--seeds 0 1 2] [--arms ...]

Arms (each fine-tuned with the shipped stage=finetune recipe: validation rounds of at least 20 steps, early stopping
on the validation loss with patience 10, at most 100 rounds with the cosine schedule over them, the best checkpoint
tested on the official 10,000 test images):
- efficientnet_imagenet: EfficientNet-Lite0 from its ImageNet weights (model=efficientnet, 64x64, grey stem);
- efficientnet_scratch: the same network from random weights (pretrained=null);
- vit_simclr: the default small ViT pre-trained with SimCLR (task=simclr) on the training images, labels unused;
- vit_mae: the same ViT pre-trained with MAE for the same number of steps;
- vit_scratch: the same ViT from random weights.
The classic pixel logistic regression on exactly these samples is in ../label_efficiency/results_classic.json
(`seed=<s>` draws the same validation split and few labels in every arm). Results go to results.json after every
run (re-read before each write, so two drivers with disjoint --arms can share it; a rerun skips what is done),
results.md; run folders to outputs/experiments/vision_backbones/. results_fixed30.json holds the earlier round
(a fixed 30-epoch schedule, validating every epoch).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "label_efficiency"))
from common import ROOT, record_result, run_summary, spread, train  # noqa: E402

RUNS = ROOT / "outputs" / "experiments" / "vision_backbones"
RESULTS = HERE / "results.json"
CLASSIC = HERE.parent / "label_efficiency" / "results_classic.json"
ARMS = ["efficientnet_imagenet", "efficientnet_scratch", "vit_simclr", "vit_mae", "vit_scratch"]
PRETRAIN = {"vit_simclr": ["model=vit", "stage=pretrain", "task=simclr"], "vit_mae": ["model=vit", "stage=pretrain"]}


def finetune_overrides(arm: str, fraction: float, seed: int, pretrained: dict[str, Path], epochs: int) -> list[str]:
    family = arm.split("_")[0]
    out = [f"model={family}", "stage=finetune", f"seed={seed}", f"trainer.max_epochs={epochs}"]
    if fraction < 1:
        out.append(f"data.label_fraction={fraction}")
    if arm in pretrained:
        out.append(f"pretrained={pretrained[arm]}")
    elif arm.endswith("scratch"):
        out.append("pretrained=null")
    return out


def label_fraction(text: str) -> float:
    """A --fractions value: the share of the training labels, in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a share of the training labels in (0, 1], e.g. 0.01 or 0.1")
    return value


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"pretrain": {}, "runs": {}}


def report(results: dict) -> None:
    classic = json.loads(CLASSIC.read_text()) if CLASSIC.is_file() else {}
    fractions = sorted({r["fraction"] for r in results["runs"].values()})
    lines = ["| labels | pixels + logistic regression | " + " | ".join(ARMS) + " |", "|---|---|" + "---|" * len(ARMS)]
    for f in fractions:
        base = np.array([v["test/acc"] for k, v in classic.items() if k.startswith(f"vision-{f:.0%}-")]) * 100
        cells = [f"{spread(base)} (n={len(base)})" if len(base) else "–"]
        for arm in ARMS:
            runs = [r for r in results["runs"].values() if r["arm"] == arm and r["fraction"] == f]
            acc = np.array([r["test/acc"] for r in runs]) * 100
            minutes = np.mean([r["seconds"] for r in runs]) / 60 if runs else 0
            capped = sum(r.get("stopped") == "cap" for r in runs)
            ended = f", {capped} at the cap" if capped else ""
            cells.append(f"{spread(acc)} (n={len(runs)}, {minutes:.0f} min{ended})" if runs
                         else "not run")
        lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
    cost = [f"- {arm} pre-training: {p['steps']} steps, {p['seconds'] / 60:.0f} min, final val/loss "
            f"{p['val/loss']:.3f}, val/knn_acc {p.get('val/knn_acc', float('nan')):.3f}"
            for arm, p in results["pretrain"].items()]
    text = "\n".join(lines + [""] + cost) + "\n"
    (HERE / "results.md").write_text(text)
    print(text, flush=True)


def last_metrics(run_dir: Path) -> dict[str, float]:
    import csv

    found: dict[str, float] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            found.update({k: float(v) for k, v in row.items() if v and k.startswith("val/")})
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=label_fraction, nargs="+", default=[0.01, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--max-epochs", type=int, default=100,
                   help="the cap in validation rounds, which the cosine schedule spans (the recipe's 100)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    results = load(RESULTS)
    if args.report_only:
        report(results)
        return
    pretrained: dict[str, Path] = {}
    for arm in [a for a in args.arms if a in PRETRAIN]:
        run_dir = RUNS / f"{arm}_pretrain"
        if arm not in results["pretrain"]:
            start = time.perf_counter()
            train(RUNS, f"{arm}_pretrain", [*PRETRAIN[arm], f"trainer.max_steps={args.pretrain_steps}",
                                            f"trainer.val_check_interval={max(1, args.pretrain_steps // 5)}"])
            results = record_result(RESULTS, results, "pretrain", arm, {
                "steps": args.pretrain_steps, "seconds": round(time.perf_counter() - start), **last_metrics(run_dir)})
        pretrained[arm] = run_dir
    for fraction in args.fractions:
        for seed in args.seeds:
            for arm in args.arms:
                name = f"{arm}-f{fraction:g}-s{seed}"
                if name in results["runs"]:
                    continue
                start = time.perf_counter()
                run_dir = train(RUNS, name, finetune_overrides(arm, fraction, seed, pretrained, args.max_epochs))
                metrics = json.loads((run_dir / "test_metrics.json").read_text())["metrics"]
                results = record_result(RESULTS, results, "runs", name, {
                    "arm": arm, "fraction": fraction, "seed": seed, "seconds": round(time.perf_counter() - start),
                    "test/acc": metrics["test/acc"], "test/f1": metrics["test/f1"],
                    **run_summary(run_dir, args.max_epochs)})
                report(results)


if __name__ == "__main__":
    main()

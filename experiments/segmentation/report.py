"""Collect the segmentation experiment's runs into results.json (beside the runs) and print two markdown tables:
test mIoU per arm and mask budget (mean ± the sample standard deviation over seeds), and each run's cost."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "label_efficiency"))
from common import spread  # noqa: E402  (mean ± sample std, as the other write-ups report it)

ARMS = ["efficientnet_imagenet", "resnet_scratch", "vit_simclr", "vit_mae", "vit_mae_pix", "vit_scratch"]


def collect(out: Path) -> dict:
    runs = {}
    for run in sorted(out.glob("*-f*-s*")):
        metrics_file = run / "test_metrics.json"
        if not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text())["metrics"]
        throughput = json.loads((run / "throughput.json").read_text()) if (run / "throughput.json").is_file() else {}
        best = next((run / "checkpoints").glob("best-step*.ckpt"), None)
        runs[run.name] = {**metrics, "steps": throughput.get("steps"),
                          "seconds": round(throughput.get("wall_seconds", 0)),
                          "best_step": int(best.stem.removeprefix("best-step")) if best else None}
    return runs


def cells(runs: dict) -> tuple[list[str], list[str], dict[tuple[str, str], list[dict]]]:
    """The arms and mask fractions present, and the runs (one per seed) of each (arm, fraction)."""
    found: dict[tuple[str, str], list[dict]] = {}
    for name, run in runs.items():
        arm, rest = name.split("-f")
        found.setdefault((arm, rest.split("-s")[0]), []).append(run)
    arms = sorted({a for a, _ in found}, key=lambda a: ARMS.index(a) if a in ARMS else len(ARMS))
    return arms, sorted({f for _, f in found}, key=float), found


def table(runs: dict) -> str:
    arms, fractions, found = cells(runs)
    head = " | ".join(f"{float(f):.0%} masks" for f in fractions)
    lines = ["**test mIoU (%)**, mean ± sample std over seeds", "", f"| arm | {head} |",
             "|---|" + "---|" * len(fractions)]
    for arm in arms:
        row = [f"{spread(np.array([100 * r['test/miou'] for r in found[(arm, f)]]))} (n={len(found[(arm, f)])})"
               if (arm, f) in found else "not run" for f in fractions]
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    lines += ["", "**per run**: mIoU / steps run (step of the best checkpoint) / wall seconds, seeds in order", "",
              f"| arm | {head} |", "|---|" + "---|" * len(fractions)]
    for arm in arms:
        row = [" ; ".join(f"{100 * r['test/miou']:.1f} / {r['steps']} ({r['best_step']}) / {r['seconds']}"
                          for r in found.get((arm, f), [])) or "not run" for f in fractions]
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    runs = collect(out)
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    print(table(runs))

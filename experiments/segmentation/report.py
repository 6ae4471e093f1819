"""Collect the segmentation experiment's runs into results.json (beside the runs) and print a markdown table."""

from __future__ import annotations

import json
import sys
from pathlib import Path


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


def table(runs: dict) -> str:
    arms = sorted({name.split("-f")[0] for name in runs})
    fractions = sorted({name.split("-f")[1].split("-s")[0] for name in runs}, key=float)
    lines = ["| arm | " + " | ".join(f"{float(f):.0%} masks: mIoU / steps (best) / s" for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for arm in arms:
        cells = []
        for f in fractions:
            found = [r for n, r in runs.items() if n.startswith(f"{arm}-f{f}-")]
            cells.append(" ; ".join(f"{100 * r['test/miou']:.1f} / {r['steps']} ({r['best_step']}) / {r['seconds']}"
                                    for r in found) or "not run")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    runs = collect(out)
    (out / "results.json").write_text(json.dumps(runs, indent=2))
    print(table(runs))

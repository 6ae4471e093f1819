"""Named entities on WNUT-16 tweets: does pre-training help a tagger? MiniLM (pre-trained elsewhere), our BERT
(masked LM on BBC News, here), and the same BERT from random weights, entity F1 on the held-out tweets.

    .venv/bin/python experiments/ner/run.py --jobs 2

1. Pre-training (once): BERT-mini (4 layers, width 256) with masked LM on the 2,127 BBC News articles (news, not
   tweets: no WNUT text is in the corpus), `--pretrain-steps` steps of 32 x 128 tokens.
2. Fine-tuning: every arm on the same seeded split of the 2,394 tweets (70 / 10 / 20 %, data.seed fixed), epoch
   budget with early stopping on val/f1 (`--patience` epochs, cap `--max-epochs`), the best checkpoint tested.
   One learning rate per model (`--lr-minilm`, `--lr-bert`: the same for the pre-trained and the scratch BERT);
   given several, each arm's is chosen on val/f1 at seed 0 and seeds 1, 2 rerun it. The seed changes the initial
   head, dropout and batch order; the split stays fixed.
3. results.json keeps every run (a rerun skips finished ones); results.md gets the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "label_efficiency"))
from common import ROOT, train  # noqa: E402  (the run-train.py helper the label-efficiency drivers share)

HERE = Path(__file__).resolve().parent
RUNS = ROOT / "outputs" / "experiments" / "ner"
RESULTS = HERE / "results.json"
ARMS = {"minilm": ["model=minilm"], "bert_mlm": ["model=bert"], "scratch": ["model=bert"]}
SPLIT_SEED = 1234
LOCK = threading.Lock()  # parallel runs write one results file


def finetune_overrides(arm: str, lr: float, seed: int, args: argparse.Namespace, pretrained: Path) -> list[str]:
    out = [*ARMS[arm], "stage=finetune", "task=token_classification", "data=wnut16", f"seed={seed}",
           f"data.seed={SPLIT_SEED}", f"task.optimizer.lr={lr}", "trainer.max_steps=-1",
           f"trainer.max_epochs={args.max_epochs}", "trainer.val_check_interval=1.0",
           "trainer.check_val_every_n_epoch=1", f"callbacks.early_stopping.patience={args.patience}",
           "validate_before_fit=false", *args.extra]
    if arm == "bert_mlm":
        out.append(f"pretrained={pretrained}")
    return out


def run_arm(results: dict, arm: str, lr: float, seed: int, args: argparse.Namespace, pretrained: Path) -> dict:
    name = f"{arm}-lr{lr:g}-s{seed}"
    if name not in results["runs"]:
        start = time.perf_counter()
        run_dir = train(RUNS, name, finetune_overrides(arm, lr, seed, args, pretrained),
                        threads=args.threads or (1 if args.jobs > 1 else None))
        report = json.loads((run_dir / "test_metrics.json").read_text())
        row = {
            "arm": arm, "lr": lr, "seed": seed, "seconds": round(time.perf_counter() - start),
            "best_checkpoint": Path(report["checkpoint"] or "").name, "val/f1": best_val_f1(run_dir),
            **{k: v for k, v in report["metrics"].items() if k in ("test/f1", "test/precision", "test/recall")},
            "per_type": report["entities"],
        }
        with LOCK:
            results["runs"][name] = row
            RESULTS.write_text(json.dumps(results, indent=2))
    return results["runs"][name]


def best_val_f1(run_dir: Path) -> float:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return max(float(r["val/f1"]) for r in csv.DictReader(f) if r.get("val/f1"))


def mean_std(values: list[float]) -> str:
    """Percent, mean ± the sample standard deviation (ddof=1) over seeds."""
    x = np.array(values) * 100
    return f"{x.mean():.1f} ± {x.std(ddof=1):.1f}" if len(x) > 1 else f"{x.mean():.1f}"


def table(results: dict) -> str:
    lines = ["| arm | lr (chosen on val) | test entity F1 | precision | recall | val F1 | minutes per run | n |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        chosen = results.get("chosen_lr", {}).get(arm)
        runs = [r for r in results["runs"].values() if r["arm"] == arm and r["lr"] == chosen]
        if not runs:
            continue
        minutes = np.mean([r["seconds"] for r in runs]) / 60
        keys = ("test/f1", "test/precision", "test/recall", "val/f1")
        cells = " | ".join(mean_std([r[k] for r in runs]) for k in keys)
        lines.append(f"| {arm} | {chosen:g} | {cells} | {minutes:.1f} | {len(runs)} |")
    grid = ["", "Learning-rate grid at seed 0 (val entity F1):", "",
            "| arm | " + " | ".join(f"lr {lr:g}" for lr in results["lrs"]) + " |",
            "|---|" + "---|" * len(results["lrs"])]
    for arm in ARMS:
        cells = [results["runs"].get(f"{arm}-lr{lr:g}-s0", {}).get("val/f1") for lr in results["lrs"]]
        grid.append(f"| {arm} | " + " | ".join("–" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
    return "\n".join(lines + grid) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=4000)
    p.add_argument("--pretrained", type=Path, default=None, help="an MLM run folder to reuse instead of step 1")
    p.add_argument("--lr-minilm", type=float, nargs="+", default=[1e-4])
    p.add_argument("--lr-bert", type=float, nargs="+", default=[5e-4], help="BERT-mini, pre-trained and scratch")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per run (default: 1 with --jobs 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[])
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    grids = {arm: args.lr_minilm if arm == "minilm" else args.lr_bert for arm in args.arms}
    results["lrs"] = sorted({*results.get("lrs", []), *(lr for g in grids.values() for lr in g)})
    pretrained = args.pretrained or RUNS / "bert_mlm_pretrain"
    needs_pretraining = "bert_mlm" in args.arms and not (pretrained / "checkpoints" / "last.ckpt").is_file()
    if not args.report_only and needs_pretraining:
        train(RUNS, "bert_mlm_pretrain", [
            "model=bert", "stage=pretrain", "data=bbc_news", "data.batch_size=32",
            f"trainer.max_steps={args.pretrain_steps}", "trainer.val_check_interval=500", *args.extra,
        ])
    if not args.report_only:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # the grid at seed 0
            for f in [pool.submit(run_arm, results, arm, lr, 0, args, pretrained)
                      for arm, grid in grids.items() for lr in grid]:
                f.result()
        results["chosen_lr"] = {
            **results.get("chosen_lr", {}),
            **{arm: max(grid, key=lambda lr, arm=arm: results["runs"][f"{arm}-lr{lr:g}-s0"]["val/f1"])
               for arm, grid in grids.items()},
        }
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # the chosen rate at the other seeds
            for f in [pool.submit(run_arm, results, arm, results["chosen_lr"][arm], seed, args, pretrained)
                      for arm in args.arms for seed in args.seeds if seed != 0]:
                f.result()
        RESULTS.write_text(json.dumps(results, indent=2))
    text = table(results)
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""T5: does span-corruption pre-training help translation and summarisation? T5-mini pre-trained here vs the same
T5-mini from random weights, on English -> Spanish Bible verses (BLEU, chrF) and BBC News article -> headline
(ROUGE-1/2/L), test splits never seen in pre-training.

    .venv/bin/python experiments/t5/run.py                         # everything, one arm after another
    .venv/bin/python experiments/t5/run.py --tasks summarisation --arms scratch --seeds 0 1 2

1. Splits (fixed, seeded): the 31,062 verse pairs of data=bible_en_es split as that preset splits them (stratified
   by book, 95 / 2 / 3 %); the 2,127 BBC articles as data=bbc_headlines splits them (the classification split,
   70 / 10 / 20 %). Translation fine-tunes on the first `--translation-train` shuffled training pairs.
2. Pre-training (once): span corruption (15 % noise, mean span 3) on the training side only: the BBC training
   articles and the English and the Spanish text of the training verses, one document per chapter and language.
   `--pretrain-steps` steps of 32 windows of 256 tokens; its BPE (8,192 pieces + 100 sentinels) is the fine-tunes'.
3. Fine-tuning: every arm up to `--max-epochs` epochs with early stopping on val/loss (`--patience`), the best
   checkpoint tested with greedy decoding. The scratch arm trains its own BPE on its training pairs.
4. Baselines on the same test splits, scored by the same metrics: the source copied and a word-for-word Dice
   dictionary from the training pairs (translation); the article's first words (headlines).
5. results.json keeps every run (a rerun skips finished ones); results.md gets the table.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "label_efficiency"))
from common import ROOT, csv_rows, record_result, train  # noqa: E402  (the run-train.py helper the experiment drivers share)

HERE = Path(__file__).resolve().parent
RUNS = ROOT / "outputs" / "experiments" / "t5"
RESULTS = HERE / "results.json"
SPLIT_SEED = 1234
ARMS = ["span_corruption", "scratch"]
TASKS = {  # metric keys reported per task, and the options of its fine-tune
    "translation": (("test/bleu", "test/chrf"), ["data.max_target_length=128", "data.batch_size=32"]),
    "summarisation": (("test/rouge1", "test/rouge2", "test/rougeL", "test/bleu"),
                      ["data.max_target_length=32", "data.batch_size=16"]),
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare(folder: Path, translation_train: int) -> None:
    """The pre-training corpus and the two fine-tuning folders (train / val / test .jsonl), from the presets' splits."""
    from fmlab.data.bible import read_bible_pairs
    from fmlab.data.text_pairs import TextPairsDataModule, read_bbc_headlines

    bible = TextPairsDataModule(source="bible_en_es", stratify_column="book", val_fraction=0.02,
                                test_fraction=0.03, seed=SPLIT_SEED).split({"all": read_bible_pairs()})
    bbc = TextPairsDataModule(source="bbc_headlines", stratify_column="topic", val_fraction=0.1,
                              test_fraction=0.2, seed=SPLIT_SEED).split({"all": read_bbc_headlines()})
    chapters: dict[tuple[str, str], list[str]] = {}
    for pair in bible["train"]:
        chapter = pair["ref"].rsplit(":", 1)[0]
        chapters.setdefault((chapter, "en"), []).append(pair["source"])
        chapters.setdefault((chapter, "es"), []).append(pair["target"])
    corpus = [{"text": f"{r['target']}\n\n{r['source']}"} for r in bbc["train"]]
    corpus += [{"text": " ".join(verses)} for verses in chapters.values()]
    write_jsonl(folder / "pretrain.jsonl", corpus)
    train_pairs = list(bible["train"])
    random.Random(SPLIT_SEED).shuffle(train_pairs)
    for split, rows in (("train", train_pairs[:translation_train]), ("val", bible["val"]), ("test", bible["test"])):
        write_jsonl(folder / "translation" / f"{split}.jsonl", [{"source": r["source"], "target": r["target"]}
                                                                 for r in rows])
    for split in ("train", "val", "test"):
        write_jsonl(folder / "summarisation" / f"{split}.jsonl", [{"source": r["source"], "target": r["target"]}
                                                                   for r in bbc[split]])
    print(f"pre-training corpus: {len(corpus)} documents ({len(bbc['train'])} BBC training articles, "
          f"{len(chapters)} chapters of {len(bible['train'])} training verses); translation "
          f"{min(translation_train, len(train_pairs))} / {len(bible['val'])} / {len(bible['test'])}, summarisation "
          f"{len(bbc['train'])} / {len(bbc['val'])} / {len(bbc['test'])} pairs", flush=True)


def history(run_dir: Path) -> tuple[list[float], int]:
    """val/loss per validation and the last training step, from the run's CSV log."""
    rows = csv_rows(run_dir)
    losses = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    steps = [int(r["step"]) for r in rows if r.get("step")]
    return losses, max(steps, default=0)


def finetune(results: dict, task: str, arm: str, seed: int, args: argparse.Namespace) -> dict:
    name = f"{task}-{arm}-s{seed}"
    if name in results["runs"]:
        return results["runs"][name]
    overrides = ["model=t5", "stage=finetune", "data=text_pairs", f"data.source={RUNS / 'data' / task}",
                 f"seed={seed}", f"data.seed={SPLIT_SEED}", f"task.optimizer.lr={args.lr}", "trainer.max_steps=-1",
                 f"trainer.max_epochs={args.max_epochs}", "trainer.val_check_interval=1.0",
                 "trainer.check_val_every_n_epoch=1",
                 f"callbacks.early_stopping.patience={args.patience}", "validate_before_fit=false",
                 "trainer.precision=bf16-mixed", *TASKS[task][1], *args.extra]
    if arm == "span_corruption":
        overrides.append(f"pretrained={RUNS / 'pretrain'}")
    start = time.perf_counter()
    run_dir = train(RUNS, name, overrides)
    report = json.loads((run_dir / "test_metrics.json").read_text())
    losses, steps = history(run_dir)
    row = {"task": task, "arm": arm, "seed": seed, "seconds": round(time.perf_counter() - start), "steps": steps,
           "epochs": len(losses), "best_val_loss": min(losses), "best_epoch": int(np.argmin(losses)) + 1,
           **{k: v for k, v in report["metrics"].items() if k.startswith("test/")}}
    results.update(record_result(RESULTS, results, "runs", name, row))
    return row


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def word_for_word(train_pairs: list[dict]) -> Callable[[str], str]:
    """A dictionary translator: each source word becomes the target word that co-occurs with it most (Dice
    coefficient over the training pairs' word sets); unseen words are copied."""
    source_count, target_count, joint = Counter(), Counter(), Counter()
    for pair in train_pairs:
        s, t = set(words(pair["source"])), set(words(pair["target"]))
        source_count.update(s)
        target_count.update(t)
        joint.update((a, b) for a in s for b in t)
    best: dict[str, tuple[float, str]] = {}
    for (a, b), n in joint.items():
        dice = 2 * n / (source_count[a] + target_count[b])
        if dice > best.get(a, (0.0, ""))[0]:
            best[a] = (dice, b)
    return lambda text: " ".join(best.get(w, (0.0, w))[1] for w in words(text))


def baselines(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Classic baselines on the same test splits, scored by the same metrics as the fine-tunes: for translation the
    source copied and a word-for-word Dice dictionary from the training pairs; for headlines the article's first
    words (lead), as many as the median training headline has."""
    from fmlab.tasks.text_metrics import generation_metrics

    def score(predictions: list[str], references: list[str]) -> dict[str, float]:
        metrics = generation_metrics("test")
        metrics.update(predictions, references)
        return {k: float(v) for k, v in metrics.compute().items()}

    out: dict[str, dict[str, dict[str, float]]] = {}
    train_pairs = read_pairs(folder / "translation" / "train.jsonl")
    test = read_pairs(folder / "translation" / "test.jsonl")
    translate, refs = word_for_word(train_pairs), [p["target"] for p in test]
    out["translation"] = {"copy source": score([p["source"] for p in test], refs),
                          "word for word": score([translate(p["source"]) for p in test], refs)}
    train_pairs = read_pairs(folder / "summarisation" / "train.jsonl")
    test = read_pairs(folder / "summarisation" / "test.jsonl")
    n = int(np.median([len(p["target"].split()) for p in train_pairs]))
    out["summarisation"] = {f"lead ({n} words)": score([" ".join(p["source"].split()[:n]) for p in test],
                                                       [p["target"] for p in test])}
    return out


def mean_std(values: list[float]) -> str:
    """Mean ± the sample standard deviation (ddof=1) over seeds."""
    x = np.array(values, dtype=float)
    return f"{x.mean():.1f} ± {x.std(ddof=1):.1f}" if len(x) > 1 else f"{x.mean():.1f}"


def table(results: dict) -> str:
    lines = []
    pre = results.get("pretrain")
    if pre:
        lines += [f"Pre-training: {pre['steps']} steps, {pre['minutes']:.1f} min, val span-corruption loss "
                  f"{pre['val_loss_first']:.2f} -> {pre['val_loss_last']:.2f}.", ""]
    for task, (keys, _) in TASKS.items():
        runs = [r for r in results["runs"].values() if r["task"] == task]
        if not runs:
            continue
        names = [k.split("/")[1] for k in keys]
        lines += [f"**{task}**", "", "| arm | " + " | ".join(names) + " | best val loss | epochs (best) | steps | "
                  "minutes | n |", "|---|" + "---|" * (len(keys) + 5)]
        for arm in ARMS:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            cells = " | ".join(mean_std([r[k] for r in rs]) for k in keys)
            epochs = "; ".join(f"{r['epochs']} ({r['best_epoch']})" for r in rs)
            lines.append(f"| {arm} | {cells} | {mean_std([r['best_val_loss'] for r in rs])} | {epochs} | "
                         f"{np.mean([r['steps'] for r in rs]):.0f} | {np.mean([r['seconds'] for r in rs]) / 60:.1f}"
                         f" | {len(rs)} |")
        for name, scores in results.get("baselines", {}).get(task, {}).items():
            lines.append(f"| {name} | " + " | ".join(f"{scores[k]:.1f}" for k in keys) + " | | | | | |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--translation-train", type=int, default=4000, help="training verse pairs of the fine-tune")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--pretrain-only", action="store_true")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--extra", nargs="*", default=[])
    args = p.parse_args()

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    if not args.report_only:
        if not (RUNS / "data" / "translation" / "test.jsonl").is_file():
            prepare(RUNS / "data", args.translation_train)
        if "span_corruption" in args.arms and not (RUNS / "pretrain" / "checkpoints" / "last.ckpt").is_file():
            start = time.perf_counter()
            run_dir = train(RUNS, "pretrain", [
                "model=t5", "stage=pretrain", "data=text_files", f"data.source={RUNS / 'data' / 'pretrain.jsonl'}",
                "data.batch_size=32", f"trainer.max_steps={args.pretrain_steps}", "trainer.precision=bf16-mixed",
                f"trainer.val_check_interval={max(1, args.pretrain_steps // 4)}", *args.extra,
            ])
            losses, steps = history(run_dir)
            summary = {"steps": steps, "minutes": (time.perf_counter() - start) / 60,
                       "val_loss_first": losses[0], "val_loss_last": losses[-1]}
            results.update(record_result(RESULTS, results, "pretrain", None, summary))
        if "baselines" not in results:  # computed once, as the data folder is prepared once
            results.update(record_result(RESULTS, results, "baselines", None, baselines(RUNS / "data")))
        if not args.pretrain_only:
            for task in args.tasks:
                for arm in args.arms:
                    for seed in args.seeds:
                        finetune(results, task, arm, seed, args)
    text = table(json.loads(RESULTS.read_text()) if RESULTS.is_file() else results)  # with the other driver's rows
    (HERE / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""The classic baselines of the label-efficiency study, on exactly the splits and few-label samples the fmlab runs
of text.py and vision.py draw (the data modules' own samplers; the validation split drawn as the training labels
are, `data.val_labels=matched`; the test split whole):

- BBC News topics: TF-IDF (word 1-2 grams) + logistic regression; split seed 1234 as text.py, the seed redraws
  the few labels (`data.label_seed`);
- Fashion-MNIST: logistic regression on raw pixels; the seed redraws the validation split and the few labels, as
  a `model=vit stage=finetune seed=<s>` run does.

C (inverse regularisation) is chosen on the validation split from baselines.C_GRID.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/label_efficiency/classic.py [--modalities text vision]

Writes results_classic.json (every run; a rerun skips finished ones) and classic.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from baselines import image_splits, pixel_logreg, text_splits, tfidf_logreg
from common import HERE, TEXT_SPLIT_SEED, spread

RESULTS = HERE / "results_classic.json"
# (name, label_fraction, labels_per_class) per modality; all labels once (every seed would draw the same).
SAMPLES = {
    "text": [("1%", 0.01, None), ("10%", 0.1, None), ("100%", None, None), ("4/class", None, 4),
             ("16/class", None, 16), ("64/class", None, 64)],
    "vision": [("1%", 0.01, None), ("10%", 0.1, None), ("100%", None, None)],
}


def run_one(modality: str, fraction: float | None, per_class: int | None, seed: int) -> dict:
    if modality == "text":
        from fmlab.data.labeled_text import LabeledTextDataModule

        dm = LabeledTextDataModule(source="bbc_news", seed=TEXT_SPLIT_SEED, label_seed=seed, label_fraction=fraction,
                                   labels_per_class=per_class)
        splits = text_splits(dm)
        result = tfidf_logreg(splits)
    else:
        from fmlab.data.images import ImageDataModule

        dm = ImageDataModule(source="fashion_mnist", labeled=True, val_fraction=0.05, seed=seed,
                             label_fraction=fraction, labels_per_class=per_class)
        splits = image_splits(dm)
        result = pixel_logreg(splits)
    return {**result, "sizes": {s: len(splits[s][1]) for s in splits}}


def table(results: dict, modality: str) -> str:
    name = {"text": "TF-IDF + logistic regression", "vision": "logistic regression on pixels"}[modality]
    lines = [f"**{modality}: {name}**", "", "| labels | train / val / test examples | test acc | test macro F1 | "
             "C chosen | seconds | n |", "|---|---|---|---|---|---|---|"]
    for sample, _, _ in SAMPLES[modality]:
        runs = [r for k, r in results.items() if k.startswith(f"{modality}-{sample}-s")]
        if not runs:
            continue
        acc, f1 = (np.array([r[k] for r in runs]) * 100 for k in ("test/acc", "test/f1"))
        sizes = runs[0]["sizes"]
        chosen = ", ".join(f"{r['C']:g}" for r in runs)
        lines.append(f"| {sample} | {sizes['train']} / {sizes['val']} / {sizes['test']} | {spread(acc)} | "
                     f"{spread(f1)} | {chosen} | {np.mean([r['seconds'] for r in runs]):.0f} | {len(runs)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modalities", nargs="+", default=list(SAMPLES), choices=list(SAMPLES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for modality in args.modalities:
        for sample, fraction, per_class in SAMPLES[modality] if not args.report_only else []:
            for seed in args.seeds if (fraction, per_class) != (None, None) else args.seeds[:1]:
                key = f"{modality}-{sample}-s{seed}"
                if key not in results:
                    results[key] = run_one(modality, fraction, per_class, seed)
                    RESULTS.write_text(json.dumps(results, indent=2))
                    print(key, results[key], flush=True)
    text = "\n".join(table(results, m) for m in SAMPLES)
    (HERE / "classic.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

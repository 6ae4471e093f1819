"""Classic baselines on exactly the splits and few-label samples that fmlab's data modules draw for a run:
TF-IDF (1-2 grams) + logistic regression for text, logistic regression on raw pixels for images. The inverse
regularisation C is chosen on the run's (few-label) validation split from C_GRID, as the fmlab arms choose their
checkpoint; the test split is whole. Needs scikit-learn: pip install -e ".[experiments]".
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

C_GRID = (0.1, 1.0, 10.0, 100.0)


def logistic_regression(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
    grid: Sequence[float] = C_GRID,
) -> dict:
    """Fit one multinomial logistic regression per C on `train`, keep the best on `val` accuracy, score `test`:
    {"C", "val/acc", "test/acc", "test/f1" (macro), "seconds"}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    start, best = time.perf_counter(), None
    for c in grid:
        model = LogisticRegression(C=c, max_iter=3000).fit(*train)
        val_acc = accuracy_score(val[1], model.predict(val[0]))
        if best is None or val_acc > best[0]:
            best = (val_acc, c, model)
    val_acc, c, model = best
    predicted = model.predict(test[0])
    return {"C": c, "val/acc": float(val_acc), "test/acc": float(accuracy_score(test[1], predicted)),
            "test/f1": float(f1_score(test[1], predicted, average="macro")),
            "seconds": round(time.perf_counter() - start, 1)}


def tfidf_logreg(splits: dict[str, tuple[list[str], np.ndarray]], grid: Sequence[float] = C_GRID) -> dict:
    """TF-IDF of word 1-2 grams (sublinear tf, fitted on the training texts only) + logistic regression."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    train = (vectorizer.fit_transform(splits["train"][0]), splits["train"][1])
    val, test = ((vectorizer.transform(splits[s][0]), splits[s][1]) for s in ("val", "test"))
    return logistic_regression(train, val, test, grid)


def pixel_logreg(splits: dict[str, tuple[np.ndarray, np.ndarray]], grid: Sequence[float] = C_GRID) -> dict:
    """Logistic regression on raw pixels, standardised per pixel with the training images' statistics."""
    x_train = splits["train"][0].reshape(len(splits["train"][0]), -1).astype(np.float32)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        x = splits[split][0].reshape(len(splits[split][0]), -1).astype(np.float32)
        return (x - mean) / std, splits[split][1]

    return logistic_regression(features("train"), features("val"), features("test"), grid)


def text_splits(dm) -> dict[str, tuple[list[str], np.ndarray]]:
    """(texts, label ids) per split of a LabeledTextDataModule, with the few-label draw a run on it trains on."""
    records = dm.labeled_records()
    labels = {s: np.array([r["label_id"] for r in records[s]]) for s in records}
    keep = dm.few_label_selection(labels, regression=False)
    return {s: ([str(records[s][i][dm.text_column]) for i in keep[s]], labels[s][keep[s]]) for s in keep}


def image_splits(dm) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(uint8 images, labels) per split of a set-up labeled ImageDataModule: the images a run on it sees."""
    dm.setup()
    sets = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}
    return {s: (d.images.numpy(), d.labels.numpy()) for s, d in sets.items()}

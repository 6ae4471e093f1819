"""Small labeled text sets for the fine-tuning tests: each class writes with its own words."""

from __future__ import annotations

import csv
import random
from pathlib import Path

from tests.conftest import WORDS

TOPICS = ["business", "tech", "sport", "politics", "music"]


def labeled_rows(per_class: int = 30, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(per_class):
        for k, topic in enumerate(TOPICS):
            words = WORDS[k * 6 : k * 6 + 6]
            rows.append({"text": f"item {i} " + " ".join(rng.choice(words) for _ in range(20)), "label": topic})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_labeled_csv(path: Path, per_class: int = 30, seed: int = 0) -> Path:
    return write_csv(path, labeled_rows(per_class, seed))

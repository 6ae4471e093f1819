"""Entity-level precision, recall and F1 over tag sequences (BIO / BIOES, read as fmlab/tags.py reads them), as
CoNLL's `conlleval` and `seqeval` (default mode) score them: an entity counts only when its type and both boundaries
match exactly.

Counts live in summed tensor states, so the metric gathers across DDP ranks like any torchmetrics metric.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from fmlab.tags import IGNORE, entities, entity_types


def scores(correct: torch.Tensor, predicted: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(precision, recall, F1) from entity counts, elementwise; 0 where a count is 0."""
    correct, predicted, gold = correct.float(), predicted.float(), gold.float()
    p, r = correct / predicted.clamp(min=1), correct / gold.clamp(min=1)
    return p, r, torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-12), torch.zeros_like(p))


class EntityScores(Metric):
    """Micro precision / recall / F1 of entities, and F1 per type, from tag ids (B, T) where IGNORE marks
    positions without a tag. `compute` returns {"precision", "recall", "f1", "f1_<type>"...}."""

    full_state_update = False

    def __init__(self, label_names: Sequence[str]) -> None:
        super().__init__()
        self.label_names = list(label_names)
        self.types = entity_types(label_names)
        n = len(self.types)
        for name in ("correct", "predicted", "gold"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, targets: torch.Tensor) -> None:
        index = {t: i for i, t in enumerate(self.types)}
        counts = torch.zeros(3, len(self.types), dtype=torch.long)
        for pred_row, gold_row in zip(preds.tolist(), targets.tolist(), strict=True):
            kept = [(p, g) for p, g in zip(pred_row, gold_row, strict=True) if g != IGNORE]
            predicted = entities([self.label_names[p] for p, _ in kept])
            gold = entities([self.label_names[g] for _, g in kept])
            for row, spans in enumerate((predicted & gold, predicted, gold)):
                for kind, _, _ in spans:
                    counts[row, index[kind]] += 1
        self.correct += counts[0].to(self.correct.device)
        self.predicted += counts[1].to(self.predicted.device)
        self.gold += counts[2].to(self.gold.device)

    def compute(self) -> dict[str, torch.Tensor]:
        p, r, f = scores(self.correct.sum(), self.predicted.sum(), self.gold.sum())
        out = {"precision": p, "recall": r, "f1": f}
        _, _, per_type = scores(self.correct, self.predicted, self.gold)
        out.update({f"f1_{kind}": per_type[i] for i, kind in enumerate(self.types)})
        return out

    def report(self) -> dict[str, dict[str, float]]:
        """Per type: precision, recall, f1 and support (gold entities), for test_metrics.json."""
        p, r, f = scores(self.correct, self.predicted, self.gold)
        return {kind: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                       "support": int(self.gold[i])} for i, kind in enumerate(self.types)}

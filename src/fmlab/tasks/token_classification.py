"""Token classification (named entities, any per-token tags) on any text backbone: a tag per token
(fmlab/tasks/heads.py TokenClassifier), fine-tuned by the shared machinery of fmlab/tasks/finetune.py, scored on
entities (fmlab/tasks/entity_metrics.py); at test also precision / recall / F1 / support per entity type.
"""

from __future__ import annotations

from fmlab.models.transformer import num_params
from fmlab.tasks.base import to_plain
from fmlab.tasks.finetune import FinetuneTask
from fmlab.tasks.heads import TokenClassifier


class TokenClassificationTask(FinetuneTask):
    """Logs `*/loss`, `*/token_acc` and, for val and test, entity `*/precision`, `*/recall`, `*/f1` (micro, exact
    spans) and `*/f1_<type>`; `test_metrics.json` gets the per-type report. `label_names`: the tag set, from the
    data (saved in the checkpoint, so export and eval name the tags)."""

    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict,
        label_names: list[str],
        finetune_mode: str = "full",
        layer_decay: float | None = None,
        lora: dict | None = None,
        head: dict | None = None,
        drop_path: float | None = None,
    ) -> None:
        super().__init__(model, optimizer, scheduler, finetune_mode, layer_decay, lora, drop_path)
        head = dict(to_plain(head) or {})
        label_names = list(label_names)
        self.save_hyperparameters({**self.hparams, "label_names": label_names, "head": head})
        self.head = TokenClassifier(self.model.width, label_names, **head)
        self.init_metrics()
        self.test_report: dict = {}

    def label_names(self) -> list[str]:
        return list(self.head.label_names)

    def on_test_epoch_end(self) -> None:
        self.test_report = {"labels": self.label_names(),
                            "entities": self.metrics["test_metrics"]["entity"].report()}
        super().on_test_epoch_end()

    def flops_per_sample(self, seq_len: int | None = None) -> float:
        """The backbone's FLOPs plus the head's on every position (6 per weight and position)."""
        positions = seq_len or self.model.config.block_size
        return self.model.encode_flops(seq_len) + 6 * num_params(self.head) * positions

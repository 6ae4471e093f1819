"""The progress bar: Lightning's rich bar, which reads `Epoch 0/-2` when a run is bounded by steps; this one says
`Epoch 0` then, and `Epoch 0/9` when epochs bound it."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class ProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"

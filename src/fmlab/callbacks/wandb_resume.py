"""The W&B run across a resume: checkpoints carry the run id; `fmlab.resume.resume_logger_runs` hands it back."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from fmlab.resume import LOGGER_IDS


class WandbResume(L.Callback):
    """Write the W&B run id of the run's `WandbLogger` into every checkpoint, under `checkpoint["logger_ids"]`.

    Lightning saves no logger state, so a resumed run would start a new W&B run; with the id, the resumed run's
    `WandbLogger(id=..., resume="allow")` continues the same one (offline: a new offline folder with the same id,
    which `wandb sync` uploads into that run). Ids read from the checkpoint a fit resumed from are written back when
    this run has no W&B logger, so a later resume with W&B still finds them.
    """

    def __init__(self) -> None:
        self.loaded: dict[str, str] = {}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.loaded = dict(checkpoint.get(LOGGER_IDS) or {})

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        ids = dict(self.loaded)
        # `version` is the run id once the run exists and never starts one (only rank 0 has a run; it writes the file).
        run_id = next((lg.version for lg in trainer.loggers if isinstance(lg, WandbLogger) and lg.version), None)
        if run_id:
            ids["wandb"] = str(run_id)
        if ids:
            checkpoint[LOGGER_IDS] = ids

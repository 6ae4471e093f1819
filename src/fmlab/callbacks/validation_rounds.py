"""Epoch budgets that still mean something at a handful of labels.

`stage=finetune` validates every epoch, stops after `callbacks.early_stopping.patience` validations without
improvement and caps the run at `trainer.max_epochs`. At 16 labels an epoch is one optimizer step, so patience 10
would stop a run after ten updates. `ValidationRounds` makes every count a *round*: one epoch where an epoch holds
at least `min_steps` optimizer steps, else the fewest whole epochs that do. Patience, the epoch cap and the
learning-rate schedule then scale together; with enough labels nothing changes.
"""

from __future__ import annotations

import logging
import math

import lightning as L

from fmlab.errors import check_count

log = logging.getLogger(__name__)


def epochs_per_round(steps_per_epoch: int, min_steps: int) -> int:
    """The fewest whole epochs that hold `min_steps` optimizer steps (at least one)."""
    return max(1, math.ceil(min_steps / max(steps_per_epoch, 1)))


class ValidationRounds(L.Callback):
    """Validate every round of at least `min_steps` optimizer steps, and count `max_epochs` in rounds.

    A no-op under a step budget (`trainer.max_steps` set) or step-counted validation (an integer
    `trainer.val_check_interval`), when the epochs are unbounded or unsized (an iterable corpus), or when an epoch
    already holds `min_steps` steps.
    """

    def __init__(self, min_steps: int = 20) -> None:
        check_count("callbacks.validation_rounds.min_steps", min_steps)
        self.min_steps = min_steps
        self.epochs_per_round = 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        epochs_counted = bool(trainer.check_val_every_n_epoch) and trainer.max_epochs not in (None, -1)
        if stage != "fit" or not epochs_counted or trainer.max_steps != -1:
            return
        _ = trainer.estimated_stepping_batches  # sets up the training loader: its length, per rank
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return
        steps = math.ceil(batches / trainer.accumulate_grad_batches)
        rounds = epochs_per_round(steps, self.min_steps)
        if rounds == 1 or self.epochs_per_round == rounds:
            return
        self.epochs_per_round = rounds
        for stopper in trainer.early_stopping_callbacks:  # count validations: a round is not an epoch
            if getattr(stopper, "_check_on_train_epoch_end", False):
                stopper._check_on_train_epoch_end = False
        trainer.check_val_every_n_epoch *= rounds
        trainer.fit_loop.max_epochs = trainer.max_epochs * rounds
        if trainer.fit_loop.min_epochs:
            trainer.fit_loop.min_epochs *= rounds
        log.info("%d optimizer step(s) an epoch: validating every %d epochs (%d steps); early-stopping patience and "
                 "max_epochs count these rounds (max_epochs is now %d)", steps, rounds, steps * rounds,
                 trainer.max_epochs)

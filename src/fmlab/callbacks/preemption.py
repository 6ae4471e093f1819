"""Preemption: on SIGTERM or SIGUSR1, save `last.ckpt` at the next optimizer step and end the run with a status
that asks for a rerun; `resume=auto` then continues from that step.

SLURM sends SIGTERM before it kills a job (preemption, `scancel`, the end of the grace time) and, with
`--signal=SIGUSR1@<s>`, SIGUSR1 `<s>` seconds before the time limit.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fmlab.resume import LAST
from fmlab.runtime import rank_zero_print

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL, "temporary failure, retry later": not 0, so `afterok` dependencies and `&&` chains do not
# take a preempted run for a finished one; not 1 (a crash), 2 (fmlab's user error) or 128 + n (killed by signal n,
# nothing saved). Schedulers requeue on a chosen status: SLURM `RequeueExit=75` (slurm.conf), LSF `bsub -Q 75`,
# Kubernetes `podFailurePolicy` `onExitCodes: [75]`.
PREEMPTED_EXIT_STATUS = os.EX_TEMPFAIL


@dataclass(frozen=True)
class Preemption:
    """What stopped the run, at which optimizer step, and the checkpoint written there."""

    signal: str
    step: int
    path: str
    exit_status: int = PREEMPTED_EXIT_STATUS

    @property
    def message(self) -> str:
        return f"Preempted at step {self.step}: saved {self.path}; rerun with resume=auto to continue"


class Preempted(SIGTERMException):
    """Raised on every rank once the preemption checkpoint is written.

    A `SIGTERMException`, Lightning's own signal stop, so `trainer.fit` tears down as for its SIGTERM; and a
    `SystemExit` whose code is the requeue status, so the process ends with that status even where nothing catches it.
    """

    def __init__(self, preemption: Preemption) -> None:
        super().__init__(preemption.exit_status)
        self.preemption = preemption


class PreemptionCheckpoint(L.Callback):
    """Turn SIGTERM / SIGUSR1 during training into a checkpoint at the next optimizer step and a clean stop.

    The handlers are installed for the training loop only (`on_train_start` to its end), over Lightning's own.
    Lightning's SIGTERM handler makes the loops raise `SIGTERMException` at the next loop boundary, in the middle of
    a validation too, with nothing saved; its SLURM SIGUSR1 handler saves from inside the handler, between any two
    Python instructions (mid-step, and on each rank at a different point). Here a handler only records the signal.
    After each optimizer step the ranks agree (any rank's signal counts) and all save `last.ckpt` through
    `trainer.save_checkpoint` (the checkpoint IO, atomic; a collective under DDP and FSDP), where ModelCheckpoint's
    `every_n_train_steps` saves. The step then ends as usual (its loss is logged, a validation due runs) and the
    next batch raises `Preempted`, so the log of a preempted and resumed run is the uninterrupted run's; a signal in
    the last step lets the run finish. With `requeue` (the default), a SIGUSR1 inside a SLURM job also requeues it
    with `scontrol requeue`, as Lightning's SLURM handler does; SIGTERM does not (SLURM requeues a preempted job
    itself, and `scancel` must not come back).
    """

    def __init__(
        self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1"), exit_status: int = PREEMPTED_EXIT_STATUS,
        requeue: bool = True,
    ) -> None:
        self.signals = [signal.Signals[name] if isinstance(name, str) else signal.Signals(name) for name in signals]
        self.exit_status = exit_status
        self.requeue = requeue
        self.preemption: Preemption | None = None  # set once the preemption checkpoint is written
        self._received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._step = -1

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # A handler runs between two Python instructions of the main thread: only record, act at a step boundary.
        if self._received is None:
            self._received = signal.Signals(signum).name
            log.info("%s received: saving %s after this optimizer step", self._received, LAST)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.preemption, self._received, self._step = None, None, trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            log.warning("Training outside the main thread: SIGTERM/SIGUSR1 will not save a checkpoint")
            return
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._record)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step:
            return  # a micro-batch of an accumulation: no optimizer step yet, not a point to resume from
        self._step = trainer.global_step
        # Lightning's flag covers a SIGTERM that came after its handler was installed and before ours.
        asked = self._received is not None or trainer.received_sigterm
        if trainer.world_size > 1:  # every rank must take the same branch: saving is a collective
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if asked and self.preemption is None:
            received = self._received or "SIGTERM"  # a rank that did not see it itself: the other ranks' signal
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
            self.preemption = Preemption(received, trainer.global_step, str(path), self.exit_status)
            log.info("%s at step %d: saved %s", received, trainer.global_step, path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.preemption is None:
            return
        if self.requeue and self._received == "SIGUSR1" and trainer.is_global_zero and "SLURM_JOB_ID" in os.environ:
            slurm_requeue()
        raise Preempted(self.preemption)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """`last.ckpt` in the folder of the trainer's checkpoint callback, else in `<default_root_dir>/checkpoints`
    (where `resume=auto` looks)."""
    ckpt = trainer.checkpoint_callback
    if isinstance(ckpt, ModelCheckpoint) and ckpt.dirpath:
        return Path(ckpt.dirpath) / f"{ckpt.CHECKPOINT_NAME_LAST}{ckpt.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / LAST


def slurm_job_id(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """This SLURM job as `scontrol` names it: `<array job>_<task>` for an array task, else the job id."""
    array = environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{environ['SLURM_ARRAY_TASK_ID']}" if array else environ["SLURM_JOB_ID"]


def slurm_requeue() -> bool:
    """`scontrol requeue` this job: SLURM stops it and queues it again under the same job id."""
    job = slurm_job_id()
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("Could not requeue SLURM job %s: %s", job, err)
        return False
    if done.returncode:
        log.warning("scontrol requeue %s failed (%d): %s", job, done.returncode, done.stderr.strip())
        return False
    log.info("Requeued SLURM job %s", job)
    return True


def preemption_of(trainer: L.Trainer) -> Preemption | None:
    """The preemption that stopped the trainer's last fit, if its `PreemptionCheckpoint` callback stopped it."""
    callback = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    return callback.preemption if callback is not None else None


def exit_preempted(trainer: L.Trainer) -> NoReturn:
    """End a run that a signal stopped (`trainer.fit` raised `SIGTERMException`): one line, the requeue status."""
    preemption = preemption_of(trainer)
    if preemption is None:  # Lightning's own SIGTERM stop, before the training loop or without the callback
        rank_zero_print(f"Stopped by SIGTERM at step {trainer.global_step} with no checkpoint of that step; rerun "
                        "with resume=auto to continue from the last one")
        raise SystemExit(PREEMPTED_EXIT_STATUS)
    rank_zero_print(preemption.message)
    raise SystemExit(preemption.exit_status)

"""Lightning callbacks and plugins of the training runtime: atomic checkpoints, throughput and MFU, preemption, the
W&B run across a resume, the online k-NN probe of image pre-training, validation rounds of
few-label fine-tuning."""

from fmlab.callbacks.checkpoint import AtomicCheckpointIO
from fmlab.callbacks.knn_probe import KNNProbe
from fmlab.callbacks.preemption import PreemptionCheckpoint
from fmlab.callbacks.progress import ProgressBar
from fmlab.callbacks.throughput import Throughput
from fmlab.callbacks.validation_rounds import ValidationRounds
from fmlab.callbacks.wandb_resume import WandbResume

__all__ = ["AtomicCheckpointIO", "KNNProbe", "PreemptionCheckpoint", "ProgressBar", "Throughput", "ValidationRounds",
           "WandbResume"]

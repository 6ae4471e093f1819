"""Lightning callbacks and plugins of the training runtime: atomic checkpoints, throughput and MFU."""

from fmlab.callbacks.checkpoint import AtomicCheckpointIO
from fmlab.callbacks.progress import ProgressBar
from fmlab.callbacks.throughput import Throughput

__all__ = ["AtomicCheckpointIO", "ProgressBar", "Throughput"]

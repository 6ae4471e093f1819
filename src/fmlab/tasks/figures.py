"""What the image tasks share to draw their figures: pixels back from the data's normalisation, and a saved PNG
into the run's loggers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def denormalize(pixels: torch.Tensor, normalization: dict) -> torch.Tensor:
    """Normalised (B, C, H, W) pixels -> [0, 1] with the checkpoint's `normalization` (`mean`, `std` per channel;
    missing: none was applied)."""
    c = pixels.shape[1]
    mean = torch.tensor(normalization.get("mean") or [0.0] * c, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(normalization.get("std") or [1.0] * c, device=pixels.device).view(1, -1, 1, 1)
    return (pixels.float() * std + mean).clamp(0, 1)


def log_figure(loggers: list, key: str, path: Path) -> None:
    """A saved PNG into the run's W&B (`log_image`) and TensorBoard (`add_image`) loggers; others skip it."""
    for logger in loggers:
        try:
            if hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[str(path)])
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                import numpy as np
                from PIL import Image

                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB"))
                logger.experiment.add_image(key, array, dataformats="HWC")
        except Exception as err:  # a figure is a convenience: a logger that refuses it must not fail the test
            log.warning("Could not log %s to %s: %s", path.name, type(logger).__name__, err)

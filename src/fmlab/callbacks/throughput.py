"""Throughput and model FLOPs utilisation (MFU) while training, and a summary line at the end.

MFU = achieved model FLOP/s / peak FLOP/s of the hardware. Achieved FLOP/s is samples/s times the training
FLOPs of one sample, which each model family reports through `flops_per_sample()` (see `GPT.flops_per_token`):
6 FLOPs per parameter per token for the forward and backward matmuls, plus the attention term (PaLM, appendix B).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

# Dense (not 2:4 sparse) peak FLOP/s per device from the vendors' data sheets: (bf16/fp16, fp32).
# The first name contained in torch.cuda.get_device_name() wins, so the longer names come first.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12),
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "A10G": (70e12, 31.2e12),
    "L4": (121e12, 30.3e12),
    "V100": (125e12, 15.7e12),
}


def is_low_precision(precision: str | int) -> bool:
    return str(precision).startswith(("bf16", "16"))


def device_peak_flops(device_name: str, precision: str | int) -> float | None:
    """Peak FLOP/s of a GPU named like torch.cuda.get_device_name(), for the run's precision; None if unknown."""
    for name, (low, fp32) in PEAK_FLOPS.items():
        if name.lower() in device_name.lower():
            return low if is_low_precision(precision) else fp32
    return None


def measure_matmul_flops(dtype: torch.dtype = torch.float32, n: int = 512, seconds: float = 0.2) -> float:
    """FLOP/s of a square matmul on this CPU: the "peak" MFU is measured against where no data sheet applies."""
    gen = torch.Generator().manual_seed(0)  # a private generator: measuring must not move the training RNG
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / elapsed


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.size(0)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def throughput_metrics(
    samples: float, seconds: float, world_size: int = 1, flops_per_sample: float | None = None,
    peak_flops: float | None = None, tokens_per_sample: int | None = None, unit: str = "samples",
) -> dict[str, float]:
    """Rates over all ranks from one rank's `samples` in `seconds` (ranks run in step); MFU per device."""
    per_device = samples / seconds
    metrics = {f"perf/{unit}_per_sec": per_device * world_size}
    if tokens_per_sample:
        metrics["perf/tokens_per_sec"] = per_device * world_size * tokens_per_sample
    if flops_per_sample:
        metrics["perf/tflops_per_device"] = per_device * flops_per_sample / 1e12
        if peak_flops:
            metrics["perf/mfu"] = per_device * flops_per_sample / peak_flops
    return metrics


class Throughput(L.Callback):
    """Logs `perf/samples_per_sec` (or `images_per_sec`), `perf/tokens_per_sec` for text, and `perf/mfu`.

    The model (`pl_module.model`) reports its training FLOPs per sample with `flops_per_sample()`; a text model
    also has `tokens_per_sample()`, and an image model may set `sample_unit = "images"`. `peak_flops` (per device)
    overrides the device table; on CPU a matmul is timed once at start. Validation time is not counted.
    """

    def __init__(
        self, peak_flops: float | None = None, log_every_n_steps: int | None = None, measure_cpu: bool = True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.peak_flops = float(peak_flops) if peak_flops else None
        self.log_every_n_steps, self.measure_cpu, self.clock = log_every_n_steps, measure_cpu, clock
        self.summary: dict[str, Any] = {}
        self.pause_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A task whose objective changes the cost (MAE encodes a quarter of the patches) reports it itself.
        model = pl_module if hasattr(pl_module, "flops_per_sample") else getattr(pl_module, "model", pl_module)
        self.flops_per_sample = float(model.flops_per_sample()) if hasattr(model, "flops_per_sample") else None
        tokens = model.tokens_per_sample() if hasattr(model, "tokens_per_sample") else None
        self.tokens_per_sample = int(tokens) if tokens else None
        self.unit = getattr(model, "sample_unit", "samples")
        self.peak = self.peak_flops or self._device_peak(trainer, pl_module)
        if self.flops_per_sample is None:
            log.info("%s has no flops_per_sample(); logging throughput without MFU", type(model).__name__)
        elif self.peak is None:
            log.info("Unknown peak FLOP/s for this device; set trainer.peak_flops to log MFU")
        self.every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        self.start_step = self.last_step = trainer.global_step
        self.samples = self.window_samples = 0
        self.paused = self.window_paused = 0.0
        self.start_time = self.window_start = self._now(pl_module)

    def _device_peak(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        if pl_module.device.type == "cuda":
            return device_peak_flops(torch.cuda.get_device_name(pl_module.device), trainer.precision)
        if pl_module.device.type == "cpu" and self.measure_cpu:
            dtype = torch.bfloat16 if is_low_precision(trainer.precision) else torch.float32
            return measure_matmul_flops(dtype)
        return None

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # only at measurement points, not every step
        return self.clock()

    def _metrics(self, samples: float, seconds: float, world_size: int) -> dict[str, float]:
        return throughput_metrics(
            samples, seconds, world_size, self.flops_per_sample, self.peak, self.tokens_per_sample, self.unit
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        n = batch_size(batch)
        self.samples += n
        self.window_samples += n
        step = trainer.global_step
        if step == self.last_step or step % self.every:
            return
        self.last_step = step
        now = self._now(pl_module)
        seconds = now - self.window_start - self.window_paused
        if seconds > 0:
            metrics = self._metrics(self.window_samples, seconds, trainer.world_size)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self.window_start, self.window_samples, self.window_paused = now, 0, 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # validation inside fit: stop the clock
            self.pause_start = self._now(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pause_start is not None:
            pause = self._now(pl_module) - self.pause_start
            self.paused += pause
            self.window_paused += pause
            self.pause_start = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wall = self._now(pl_module) - self.start_time
        seconds = wall - self.paused
        world = trainer.world_size
        self.summary = {"steps": trainer.global_step - self.start_step, self.unit: self.samples * world,
                        "wall_seconds": wall, "train_seconds": seconds}
        if self.tokens_per_sample:
            self.summary["tokens"] = self.samples * world * self.tokens_per_sample
        if seconds > 0 and self.samples:
            self.summary.update({k.split("/", 1)[1]: v for k, v in self._metrics(self.samples, seconds, world).items()})
        self._report(trainer)

    @rank_zero_only
    def _report(self, trainer: L.Trainer) -> None:
        s = self.summary
        parts = [f"{s['steps']} steps", f"{s[self.unit]:,} {self.unit}"]
        if "tokens" in s:
            parts.append(f"{s['tokens']:,} tokens")
        parts.append(f"{s['wall_seconds']:.1f} s wall ({s['train_seconds']:.1f} s training)")
        if f"{self.unit}_per_sec" in s:
            parts.append(f"{s[f'{self.unit}_per_sec']:,.1f} {self.unit}/s")
        if "tokens_per_sec" in s:
            parts.append(f"{s['tokens_per_sec']:,.0f} tokens/s")
        if "mfu" in s:
            parts.append(f"MFU {100 * s['mfu']:.3g}%")
        log.info("Throughput: %s", ", ".join(parts))
        if trainer.default_root_dir:
            path = Path(trainer.default_root_dir) / "throughput.json"
            path.write_text(json.dumps({**s, "peak_flops": self.peak, "flops_per_sample": self.flops_per_sample},
                                       indent=2))

"""Throughput and model FLOPs utilisation (MFU) while training, and a summary line at the end.

MFU = achieved model FLOP/s / peak FLOP/s of the hardware. Achieved FLOP/s is the training FLOPs of the batches
run in a window over its time; the task (or else its model) counts them (see `Throughput`): 6 FLOPs per weight
per token for the forward and backward matmuls, plus the attention term (PaLM, appendix B), less what the run
does not compute (frozen weights' gradients, positions a head never projects). An MFU above 100 % means the peak
was no upper bound, so it is reported as unknown instead.
"""

from __future__ import annotations

import json
import logging
import math
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


def matmul_dtype(precision: str | int) -> torch.dtype:
    """The dtype the run's matmuls use under a Lightning precision (`bf16-mixed` autocasts them to bf16)."""
    text = str(precision)
    if text.startswith("bf16"):
        return torch.bfloat16
    if text.startswith("16"):
        return torch.float16
    return torch.float64 if text.startswith("64") else torch.float32


def device_peak_flops(device_name: str, precision: str | int) -> float | None:
    """Peak FLOP/s of a GPU named like torch.cuda.get_device_name(), for the run's precision; None if unknown."""
    for name, (low, fp32) in PEAK_FLOPS.items():
        if name.lower() in device_name.lower():
            return low if is_low_precision(precision) else fp32
    return None


def measure_matmul_flops(
    dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 0.5, repeats: int = 3
) -> float:
    """Best FLOP/s of an n x n matmul on this CPU at `dtype` and `torch.get_num_threads()` threads: the peak MFU is
    measured against where no data sheet applies. One warm-up product (thread pool, packing buffers, first-touch
    pages), then timed products until `seconds` pass and at least `repeats`; the fastest one counts, since a
    slower repetition only saw interference."""
    gen = torch.Generator().manual_seed(0)  # a private generator: measuring must not move the training RNG
    a, b = torch.randn(n, n, generator=gen).to(dtype), torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.matmul(a, b, out=out)
    best, reps, start = math.inf, 0, time.perf_counter()
    while reps < repeats or time.perf_counter() - start < seconds:
        tick = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - tick)
        reps += 1
    return 2 * n**3 / best


# CPU peaks measured in this process, by (dtype, threads, sizes): a sweep's runs share one measurement.
_CPU_PEAKS: dict[tuple[torch.dtype, int, tuple[int, ...]], float] = {}


def cpu_peak_flops(dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024, 2048), seconds: float = 0.6) -> float:
    """The best `measure_matmul_flops` over `sizes` (`seconds` shared among them), once per process for each dtype
    and thread count. Several sizes, since which one runs fastest depends on the CPU's caches and on its
    neighbours: a small product often catches a moment when no other process holds a core."""
    key = (dtype, torch.get_num_threads(), tuple(sizes))
    if key not in _CPU_PEAKS:
        _CPU_PEAKS[key] = max(measure_matmul_flops(dtype, n, seconds / len(sizes)) for n in sizes)
        log.info("CPU peak %.1f GFLOP/s: the best %s matmul of sizes %s on %d threads", _CPU_PEAKS[key] / 1e9,
                 str(dtype).removeprefix("torch."), list(sizes), key[1])
    return _CPU_PEAKS[key]


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.size(0)
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    raise TypeError(f"cannot tell the batch size of a {type(batch).__name__}")


def batch_counter(pl_module: L.LightningModule, quantity: str) -> Callable[[Any], float | None] | None:
    """batch -> its `quantity` ("flops" or "tokens"), from the first of the task and its model that defines
    `<quantity>_per_batch(batch)` (preferred) or `<quantity>_per_sample()` (times the batch size); None if neither
    does, or the per-sample answer is None."""
    for source in (pl_module, getattr(pl_module, "model", None)):
        per_batch = getattr(source, f"{quantity}_per_batch", None)
        if callable(per_batch):
            return per_batch
        per_sample = getattr(source, f"{quantity}_per_sample", None)
        if callable(per_sample):
            return times_batch_size(per_sample())
    return None


def times_batch_size(per_sample: float | None) -> Callable[[Any], float] | None:
    """batch -> `per_sample` times its size (a count that does not change per batch); None for None."""
    if not per_sample:
        return None
    value = float(per_sample)
    return lambda batch: value * batch_size(batch)


def throughput_metrics(
    samples: float, seconds: float, world_size: int = 1, flops: float | None = None,
    peak_flops: float | None = None, tokens: float | None = None, unit: str = "samples",
) -> dict[str, float]:
    """Rates over all ranks from one rank's `samples`, and their training `flops` and `tokens`, in `seconds` (ranks
    run in step); TFLOP/s and MFU per device. No `perf/mfu` when the achieved FLOP/s exceed `peak_flops`: that
    peak was no upper bound, and an MFU above 100 % would be a wrong number."""
    metrics = {f"perf/{unit}_per_sec": samples / seconds * world_size}
    if tokens:
        metrics["perf/tokens_per_sec"] = tokens / seconds * world_size
    if flops:
        achieved = flops / seconds
        metrics["perf/tflops_per_device"] = achieved / 1e12
        if peak_flops and achieved <= peak_flops:
            metrics["perf/mfu"] = achieved / peak_flops
    return metrics


class Throughput(L.Callback):
    """Logs `perf/samples_per_sec` (or `images_per_sec`), `perf/tokens_per_sec` for text, `perf/tflops_per_device`
    and `perf/mfu`, over each window of `log_every_n_steps`; validation time is not counted.

    FLOPs and tokens are counted per batch, asking the task first, then its model (`pl_module.model`): a
    `flops_per_batch(batch)` method counts what this batch costs (fine-tuning: its padded length, the mode's
    backward), else `flops_per_sample()` times the batch size (GPT windows, BERT MLM, MAE, ViT); likewise
    `tokens_per_batch(batch)` or `tokens_per_sample()`; `sample_unit = "images"` renames the samples. The peak
    (per device) is `peak_flops`, else the GPU's data-sheet figure, else on CPU the best of repeated matmuls of a
    few sizes at the run's dtype and thread count (`cpu_peak_sizes`, `cpu_peak_seconds`), once per process.
    Where the achieved FLOP/s exceed the peak, MFU is unknown (not logged), with one warning: never above 100 %.
    """

    def __init__(
        self, peak_flops: float | None = None, log_every_n_steps: int | None = None, measure_cpu: bool = True,
        clock: Callable[[], float] = time.perf_counter, cpu_peak_sizes: tuple[int, ...] = (512, 1024, 2048),
        cpu_peak_seconds: float = 0.6,
    ) -> None:
        self.peak_flops = float(peak_flops) if peak_flops else None
        self.log_every_n_steps, self.measure_cpu, self.clock = log_every_n_steps, measure_cpu, clock
        self.cpu_peak_sizes, self.cpu_peak_seconds = tuple(cpu_peak_sizes), cpu_peak_seconds
        self.summary: dict[str, Any] = {}
        self.pause_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.count_flops = batch_counter(pl_module, "flops")
        self.count_tokens = batch_counter(pl_module, "tokens")
        model = getattr(pl_module, "model", pl_module)
        self.unit = getattr(pl_module, "sample_unit", None) or getattr(model, "sample_unit", "samples")
        self.peak = self.peak_flops or self._device_peak(trainer, pl_module)
        if self.count_flops is None:
            log.info("%s counts no FLOPs (flops_per_batch / flops_per_sample); logging throughput without MFU",
                     type(pl_module).__name__)
        elif self.peak is None:
            log.info("Unknown peak FLOP/s for this device; set trainer.peak_flops to log MFU")
        self.every = self.log_every_n_steps or trainer.log_every_n_steps or 50
        self.start_step = self.last_step = trainer.global_step
        self.total = {"samples": 0, "flops": 0.0, "tokens": 0}
        self.window = dict(self.total)
        self.paused = self.window_paused = 0.0
        self.over_peak_warned = False
        self.start_time = self.window_start = self._now(pl_module)

    def _device_peak(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        if pl_module.device.type == "cuda":
            return device_peak_flops(torch.cuda.get_device_name(pl_module.device), trainer.precision)
        if pl_module.device.type == "cpu" and self.measure_cpu:
            return cpu_peak_flops(matmul_dtype(trainer.precision), self.cpu_peak_sizes, self.cpu_peak_seconds)
        return None

    def _now(self, pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # only at measurement points, not every step
        return self.clock()

    def _metrics(self, counts: dict[str, float], seconds: float, world_size: int) -> dict[str, float]:
        metrics = throughput_metrics(counts["samples"], seconds, world_size, counts["flops"] or None, self.peak,
                                     counts["tokens"] or None, self.unit)
        if self.peak and "perf/tflops_per_device" in metrics and "perf/mfu" not in metrics:
            self._warn_over_peak(metrics["perf/tflops_per_device"] * 1e12)
        return metrics

    @rank_zero_only
    def _warn_over_peak(self, achieved: float) -> None:
        if not self.over_peak_warned:
            self.over_peak_warned = True
            log.warning("Achieved %.3g FLOP/s exceed the peak %.3g FLOP/s, which is then no upper bound "
                        "(a busy CPU while it was timed, or a wrong trainer.peak_flops): MFU unknown",
                        achieved, self.peak)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        counts = {"samples": batch_size(batch),
                  "flops": self.count_flops(batch) if self.count_flops else 0.0,
                  "tokens": self.count_tokens(batch) if self.count_tokens else 0}
        for key, value in counts.items():
            self.total[key] += value or 0
            self.window[key] += value or 0
        step = trainer.global_step
        if step == self.last_step or step % self.every:
            return
        self.last_step = step
        now = self._now(pl_module)
        seconds = now - self.window_start - self.window_paused
        if seconds > 0:
            metrics = self._metrics(self.window, seconds, trainer.world_size)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        self.window_start, self.window_paused = now, 0.0
        self.window = dict.fromkeys(self.window, 0)

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
        world, total = trainer.world_size, self.total
        self.summary = {"steps": trainer.global_step - self.start_step, self.unit: total["samples"] * world,
                        "wall_seconds": wall, "train_seconds": seconds}
        if total["tokens"]:
            self.summary["tokens"] = total["tokens"] * world
        if seconds > 0 and total["samples"]:
            self.summary.update({k.split("/", 1)[1]: v for k, v in self._metrics(total, seconds, world).items()})
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
        elif self.peak and "tflops_per_device" in s:
            parts.append("MFU unknown (achieved FLOP/s above the peak)")
        line = "Throughput: " + ", ".join(parts)
        log.info(line)
        print(line, flush=True)  # a summary line of the run, beside "Done:" (the console shows no INFO logs)
        if trainer.default_root_dir:
            samples = self.total["samples"]
            per_sample = self.total["flops"] / samples if self.total["flops"] and samples else None
            path = Path(trainer.default_root_dir) / "throughput.json"
            path.write_text(json.dumps({**s, "peak_flops": self.peak, "flops_per_sample": per_sample}, indent=2))

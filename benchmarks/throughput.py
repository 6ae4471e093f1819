"""Training-step throughput: fmlab as shipped against a minimal reference and the Hugging Face Trainer.

Each workload is composed from conf/ exactly as `python train.py` composes it (model, task, optimizer, data). The
runners train the same shape on the same data from the same initial weights, with the same AdamW settings (fused,
lr, betas, weight decay on matrices), the same warm-up + cosine schedule over the same horizon (TOTAL_STEPS) and
the same gradient clipping:

- reference: benchmarks/reference.py, a minimal nanoGPT-style model of the workload's shape (fmlab's weights copied
  in; the losses of one batch are checked equal at the start) in a plain AdamW loop;
- fmlab: the trainer `train.py` builds (fmlab.runtime.build_trainer from conf/trainer, the callbacks and loggers of
  conf/callbacks and conf/logger: checkpointing, early stopping, progress bar, throughput, preemption, atomic
  checkpoint IO, CSV + offline W&B) fitting the task;
- fmlab-bare: the same trainer without callbacks or loggers;
- raw: fmlab's model and loss in a hand-written loop; raw-compiled: the same with the model compiled (`compile=true`);
- hf: `transformers.Trainer` on `GPT2LMHeadModel` / `BertForMaskedLM` holding our initial weights (mapped by
  fmlab.interop), with its default fused AdamW and our lr, betas, weight decay, warm-up and cosine floor over the
  same horizon.

A runner is `name:precision` (32 or bf16-mixed). They run interleaved in one process (A-B-C-A-B-C...) after a warm-up
chunk, so drift in machine load hits all alike. Every chunk starts a fresh optimizer and schedule (as a new Trainer
does) and is stopped after --steps steps, well inside warm-up for every runner alike; the first --drop steps of every
chunk are left out.

    .venv/bin/python benchmarks/throughput.py --workload gpt
    .venv/bin/python benchmarks/throughput.py --workload bert --runners reference:32,fmlab:32,hf:32
    .venv/bin/python benchmarks/throughput.py --workload mae
    .venv/bin/python benchmarks/throughput.py --workload tiny   # micro GPT: fmlab's own overhead in ms/step

Writes experiments/benchmarks/<workload>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference as ref  # noqa: E402

from fmlab.callbacks.throughput import batch_counter, cpu_peak_flops, matmul_dtype  # noqa: E402
from fmlab.config import compose_train_config  # noqa: E402
from fmlab.runtime import build_trainer  # noqa: E402
from fmlab.tasks.base import build_model, to_plain  # noqa: E402
from fmlab.tasks.masked_lm import mask_tokens  # noqa: E402
from fmlab.training import build_datamodule, build_task, close_loggers, instantiate_list, run_pretrained  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "benchmarks"
WORKDIR = Path(tempfile.gettempdir()) / "fmlab-bench"
TOTAL_STEPS = 10_000  # every runner's schedule horizon (warm-up: the task config's warmup_steps)
NAMES = {"reference": "reference", "fmlab": "fmlab", "fmlab-bare": "fmlab (bare)", "raw": "raw loop",
         "raw-compiled": "raw loop, compiled", "hf": "HF Trainer"}
PRECISIONS = {"32": "fp32", "bf16-mixed": "bf16"}


# ---- workloads -----------------------------------------------------------------------------------------------------

def gpt_batch(task: nn.Module, batch: torch.Tensor) -> tuple:
    return batch[:, :-1], batch[:, 1:]


def mlm_batch(task: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None) -> tuple:
    t = task.tokens()  # mask id and special-token table of the run's tokenizer
    ids = batch[:, : task.model.config.block_size]
    return mask_tokens(ids, t["mask_id"], t["special"], task.model.config.vocab_size, task.mask_prob,
                       generator=generator)


def mae_batch(task: nn.Module, batch: dict) -> tuple:
    return (batch["pixel_values"],)


def fmlab_loss(name: str) -> Callable:
    """fmlab's own loss of a batch prepared by the workload (the task's model for GPT/BERT, the MAE task itself)."""
    if name == "mae":
        return lambda task, px, generator=None: task(px, generator)[0]
    return lambda task, inputs, targets: task.model(inputs, targets)[1]


@dataclass
class Workload:
    """A `train.py` command line (as overrides), how a batch becomes model inputs, and the twin models."""

    overrides: list[str]
    batch: Callable  # (fmlab task, loader batch) -> model inputs
    reference: Callable | None  # fmlab task -> reference model
    hf_model: Callable | None = None  # (fmlab task, data module) -> (HF model, dataset, collator)
    unit: str = "tokens"
    runners: tuple[str, ...] = ("reference:32", "fmlab:32", "fmlab:bf16-mixed", "hf:32", "hf:bf16-mixed")


class Windows(Dataset):
    """Packed token windows as HF Trainer examples."""

    def __init__(self, windows: Dataset, length: int, labels: bool) -> None:
        self.windows, self.length, self.labels = windows, length, labels

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        x = self.windows[i][: self.length].long()
        return {"input_ids": x, "labels": x} if self.labels else {"input_ids": x}


def hf_from_ours(family: str, model: nn.Module, hf_class: Any, config_class: Any) -> nn.Module:
    """Our model's weights in the Hugging Face class, through fmlab.interop's mapping (export's)."""
    from fmlab.interop import family_by_model_type

    hf_cfg, state = family_by_model_type(family, "benchmark").to_hf(model, None)
    fields = {k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")}
    hf = hf_class(config_class(**fields))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    if set(missing) - tied or unexpected:
        raise KeyError(f"{hf_class.__name__}: missing {sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    return hf


def hf_gpt2(task: nn.Module, dm: Any) -> tuple[nn.Module, Dataset, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = hf_from_ours("gpt2", task.model, GPT2LMHeadModel, GPT2Config)
    # GPT2LMHeadModel shifts the labels itself: the first block_size tokens of each window are inputs and labels.
    return model, Windows(dm.train_set, task.model.config.block_size, labels=True), None


def hf_bert(task: nn.Module, dm: Any) -> tuple[nn.Module, Dataset, Any]:
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    model = hf_from_ours("bert", task.model, BertForMaskedLM, BertConfig)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(dm.describe().state["tokenizer"]), mask_token="<mask>", pad_token="<pad>",
        cls_token="<cls>", sep_token="<sep>",
    )
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=task.mask_prob)  # the 80/10/10 rule too
    return model, Windows(dm.train_set, task.model.config.block_size, labels=False), collator


def gpt_ref(task: nn.Module) -> nn.Module:
    return ref.from_fmlab_gpt(task.model)


def bert_ref(task: nn.Module) -> nn.Module:
    return ref.from_fmlab_bert(task.model)


GPT_SHAPE = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384"]
WORKLOADS = {
    # nanoGPT-like: 6 layers, width 384, block 256, no biases, exact GELU; batch 8 x 256 tokens.
    "gpt": Workload(["model=gpt", "stage=pretrain", *GPT_SHAPE, "model.block_size=256", "model.bias=false",
                     "model.activation=gelu", "data.batch_size=8"], gpt_batch, gpt_ref, hf_gpt2),
    # BERT-style post-LN encoder of the same width and depth; batch 16 x 128 tokens, 15 % masked.
    "bert": Workload(["model=bert", "stage=pretrain", *GPT_SHAPE, "model.block_size=128", "data.batch_size=16"],
                     mlm_batch, bert_ref, hf_bert),
    # The label-efficiency experiment's MAE: the default small ViT on Fashion-MNIST, batch 128.
    "mae": Workload(["model=vit", "stage=pretrain"], mae_batch, ref.from_fmlab_mae, unit="images",
                    runners=("reference:32", "fmlab:32", "fmlab:bf16-mixed")),
    # The shipped defaults as `python train.py model=gpt|bert` runs them: fmlab's precision choice (no twins).
    "gpt-default": Workload(["model=gpt", "stage=pretrain"], gpt_batch, None,
                            runners=("fmlab:32", "fmlab:bf16-mixed")),
    "bert-default": Workload(["model=bert", "stage=pretrain"], mlm_batch, None,
                             runners=("fmlab:32", "fmlab:bf16-mixed")),
    # Micro model: the step is almost all framework; fmlab with (default) and without callbacks and logger.
    "tiny": Workload(
        ["model=gpt", "stage=pretrain", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
         "data.batch_size=8"], gpt_batch, None, runners=("raw:32", "fmlab-bare:32", "fmlab:32"),
    ),
}


# ---- timing --------------------------------------------------------------------------------------------------------

class StepTimer:
    """Wall time between consecutive step ends."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last = 0.0

    def start(self) -> None:
        self.last = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


class StopAfter(L.Callback):
    """Times each step and stops the fit after `steps` of them (the schedule keeps its full horizon)."""

    def __init__(self, timer: StepTimer, steps: int) -> None:
        self.timer, self.steps = timer, steps

    def on_train_start(self, trainer, pl_module) -> None:
        self.timer.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.timer.step()
        if len(self.timer.times) >= self.steps:
            trainer.should_stop = True


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()


# ---- runners -------------------------------------------------------------------------------------------------------

class Fmlab:
    """The trainer `train.py` builds from the run's config (callbacks and loggers included), fitting the task."""

    def __init__(self, task: L.LightningModule, dm: Any, cfg: DictConfig, precision: str, extras: bool) -> None:
        self.task, self.dm, self.extras = task, dm, extras
        self.folder = WORKDIR / f"fmlab-{precision}{'' if extras else '-bare'}"
        self.cfg = cfg.copy()
        with open_dict(self.cfg):
            self.cfg.trainer.precision = precision
            self.cfg.trainer.max_steps = TOTAL_STEPS  # the horizon of the task's schedule; StopAfter ends the chunk
            self.cfg.trainer.limit_val_batches = 0  # Lightning validates when a fit stops early: not a training step
            self.cfg.paths.output_dir = str(self.folder)

    def run(self, steps: int) -> list[float]:
        shutil.rmtree(self.folder, ignore_errors=True)  # each chunk is a fresh run (and checkpoints at its end)
        self.folder.mkdir(parents=True)
        timer = StepTimer()
        callbacks: list = [StopAfter(timer, steps)]
        loggers: list = []
        if self.extras:  # as fmlab.training.train builds them
            callbacks += instantiate_list(self.cfg.get("callbacks"), "callback")
            loggers = instantiate_list(self.cfg.get("logger"), "logger")
        trainer = build_trainer(self.cfg, callbacks, loggers)
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(self.cfg, resolve=True))
        try:
            trainer.fit(self.task, datamodule=self.dm)
        finally:
            close_loggers()
        return timer.times


class Loop:
    """A plain loop: forward under autocast, backward, clip, fused AdamW step, schedule step, free the gradients."""

    def __init__(self, model: nn.Module, loss: Callable, prepare: Callable, dm: Any, cfg: DictConfig,
                 precision: str, make_optimizer: Callable) -> None:
        self.model, self.loss, self.prepare, self.precision = model, loss, prepare, precision
        self.make_optimizer, self.clip = make_optimizer, cfg.trainer.gradient_clip_val
        collate = dm.train_dataloader().collate_fn  # the data module's own batching (images: batched transforms)
        self.loader = DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=True, drop_last=True,
                                 collate_fn=collate)
        self.batches = iter(())

    def next_batch(self) -> Any:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def run(self, steps: int) -> list[float]:
        opt, sched = self.make_optimizer()  # a fresh optimizer and schedule, as every other runner's chunk
        timer = StepTimer()
        timer.start()
        self.model.train()
        for _ in range(steps):
            inputs = self.prepare(self.next_batch())
            with autocast(self.precision):
                loss = self.loss(self.model, *inputs)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            timer.step()
        return timer.times


def optimizer_settings(cfg: DictConfig) -> dict:
    opt, sched = to_plain(cfg.task.optimizer), to_plain(cfg.task.scheduler)
    return {"lr": opt["lr"], "betas": opt["betas"], "weight_decay": opt.get("weight_decay", 0.0),
            "warmup_steps": min(sched.get("warmup_steps") or 1, TOTAL_STEPS), "total_steps": TOTAL_STEPS,
            "min_lr_ratio": sched.get("min_lr_ratio", 0.1)}


class HFTrainer:
    """`transformers.Trainer` with its defaults (fused AdamW, decay on all but biases and norms) on the Hugging Face
    model holding our initial weights; our lr, betas, weight decay, warm-up and cosine floor over the same horizon
    (max_steps = TOTAL_STEPS), stopped after the chunk's steps."""

    def __init__(self, task: nn.Module, dm: Any, cfg: DictConfig, precision: str, make_model: Callable) -> None:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        self.model, dataset, collator = make_model(task, dm)
        self.timer = timer = StepTimer()
        settings = optimizer_settings(cfg)

        class StopAfterSteps(TrainerCallback):
            steps = 0

            def on_train_begin(self, args, state, control, **kw):
                timer.start()

            def on_step_end(self, args, state, control, **kw):
                timer.step()
                control.should_training_stop = state.global_step >= self.steps

        self.stop = StopAfterSteps()

        def make() -> Trainer:
            args = TrainingArguments(
                output_dir=str(WORKDIR / "hf"), max_steps=TOTAL_STEPS, per_device_train_batch_size=dm.batch_size,
                learning_rate=settings["lr"], adam_beta1=settings["betas"][0], adam_beta2=settings["betas"][1],
                weight_decay=settings["weight_decay"], warmup_steps=settings["warmup_steps"],
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": settings["min_lr_ratio"]},
                max_grad_norm=cfg.trainer.gradient_clip_val, bf16=precision == "bf16-mixed", use_cpu=True,
                save_strategy="no", report_to=[], logging_steps=TOTAL_STEPS, dataloader_num_workers=0,
                disable_tqdm=True, seed=0,
            )
            return Trainer(model=self.model, args=args, train_dataset=dataset, data_collator=collator,
                           callbacks=[self.stop])

        self.make = make

    def run(self, steps: int) -> list[float]:
        self.timer.times = []
        self.stop.steps = steps
        trainer = self.make()
        trainer.train()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
        self.optim = type(opt).__name__, opt.defaults.get("fused")
        return self.timer.times


# ---- the same start: one batch, one loss --------------------------------------------------------------------------

def check_same_start(name: str, workload: Workload, task: nn.Module, dm: Any, reference: nn.Module | None,
                     hf: nn.Module | None, tolerance: float = 1e-4) -> dict[str, float]:
    """fp32 losses of fmlab's model, the reference and the HF model on the first training batch (dropout off):
    equal within `tolerance`, or the benchmark stops."""
    batch = next(iter(dm.train_dataloader()))
    generator = torch.Generator().manual_seed(0)
    loss = fmlab_loss(name)
    losses = {}
    was = task.training
    task.eval()
    with torch.no_grad():
        if name == "bert":
            inputs = mlm_batch(task, batch, generator)
        else:
            inputs = workload.batch(task, batch)
        extra = {"generator": torch.Generator().manual_seed(0)} if name == "mae" else {}
        losses["fmlab"] = float(loss(task, *inputs, **extra))
        if reference is not None:
            reference.eval()
            extra = {"generator": torch.Generator().manual_seed(0)} if name == "mae" else {}
            losses["reference"] = float(reference(*inputs, **extra))
            reference.train()
        if hf is not None:
            hf.eval()
            if name == "gpt":  # HF shifts: it predicts inputs[1:] from inputs[:-1], fmlab the same with the last off
                x = inputs[0]
                targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
                losses["fmlab (HF positions)"] = float(task.model(x, targets)[1])
                losses["HF"] = float(hf(input_ids=x, labels=x).loss)
            else:
                losses["HF"] = float(hf(input_ids=inputs[0], labels=inputs[1]).loss)
            hf.train()
    task.train(was)
    for other in ("reference", "HF"):
        if other not in losses:
            continue
        value, base = losses[other], losses.get("fmlab (HF positions)" if other == "HF" else "fmlab", losses["fmlab"])
        if abs(value - base) > tolerance * max(1.0, abs(base)):
            raise AssertionError(f"{name}: {other} loss {value} differs from fmlab's {base} on the same weights")
    return losses


# ---- build and run -------------------------------------------------------------------------------------------------

def runner_specs(spec: str | None, workload: Workload, no_hf: bool) -> list[tuple[str, str]]:
    specs = []
    for item in spec.split(",") if spec else workload.runners:
        kind, _, precision = item.partition(":")
        if kind not in NAMES or (precision or "32") not in PRECISIONS:
            raise SystemExit(f"error: --runners: {item!r}; runners are {sorted(NAMES)}, "
                             f"precisions {sorted(PRECISIONS)}")
        if not (no_hf and kind == "hf"):
            specs.append((kind, precision or "32"))
    return specs


def label(kind: str, precision: str) -> str:
    return f"{NAMES[kind]} {PRECISIONS[precision]}"


def build(name: str, specs: list[tuple[str, str]], batch_size: int | None, logger: str) -> tuple:
    """Compose the workload, build its data once and every runner from the same initial weights; check the losses."""
    workload = WORKLOADS[name]
    overrides = [*workload.overrides, f"logger={logger}"]
    if batch_size:
        overrides.append(f"data.batch_size={batch_size}")
    cfg = compose_train_config(overrides, WORKDIR)
    pretrained = run_pretrained(cfg)
    dm = build_datamodule(cfg, pretrained)
    dm.prepare_data()
    dm.setup("fit")

    def task() -> L.LightningModule:
        torch.manual_seed(0)
        return build_task(cfg, dm, pretrained)

    probe = task()  # the initial weights every runner starts from
    runners: dict[str, Any] = {}
    reference = hf = None
    settings = optimizer_settings(cfg)
    for kind, precision in specs:
        key = label(kind, precision)
        if kind.startswith("fmlab"):
            runners[key] = Fmlab(task(), dm, cfg, precision, extras=kind == "fmlab")
        elif kind in ("raw", "raw-compiled"):
            t = task()
            if kind == "raw-compiled":
                t.model.compile()  # as `compile=true` does in train.py; compiles in the warm-up chunk
            runners[key] = Loop(t, lambda m, *x: fmlab_loss(name)(m, *x), lambda b, t=t: workload.batch(t, b), dm,
                                cfg, precision, lambda t=t: t.build_optimizer(TOTAL_STEPS))
        elif kind == "reference":
            if workload.reference is None:
                raise SystemExit(f"error: --workload {name}: it has no reference model")
            model = workload.reference(task())
            reference = reference or workload.reference(probe)
            runners[key] = Loop(model, lambda m, *x: m(*x), lambda b: workload.batch(probe, b), dm, cfg,
                                precision, lambda m=model: ref.reference_optimizer(m, **settings))
        elif kind == "hf":
            if workload.hf_model is None:
                raise SystemExit(f"error: --workload {name}: it has no Hugging Face twin")
            runners[key] = HFTrainer(task(), dm, cfg, precision, workload.hf_model)
            hf = hf or runners[key].model
    losses = check_same_start(name, workload, probe, dm, reference, hf) if reference or hf else {}
    return cfg, dm, runners, losses


def summarize(times: list[float], per_step: int) -> dict:
    ms = np.array(times) * 1000
    median = float(np.median(ms))
    return {"steps": len(ms), "median_ms": median, "min_ms": float(ms.min()),
            "p90_ms": float(np.percentile(ms, 90)), "per_s": per_step / (median / 1000)}


def step_flops(task: L.LightningModule, dm: Any) -> float | None:
    """The training FLOPs of one step, as the throughput callback counts them (every runner does the same work)."""
    counter = batch_counter(task, "flops")
    return float(counter(next(iter(dm.train_dataloader())))) if counter else None


def add_mfu(rows: dict[str, dict], precisions: dict[str, str], flops: float | None) -> dict[str, float]:
    """Each row's achieved TFLOP/s and its share of this CPU's best matmul at the row's dtype (measured now, after
    the timed rounds, on the same threads): how much headroom any runner has left. Returns the peaks, GFLOP/s."""
    if not flops:
        return {}
    peaks = {p: cpu_peak_flops(matmul_dtype(p)) for p in sorted(set(precisions.values()))}
    for name, row in rows.items():
        achieved = flops / (row["median_ms"] / 1000)
        row["tflops"] = achieved / 1e12
        row["of_matmul_peak"] = achieved / peaks[precisions[name]]
    return {PRECISIONS[p]: v / 1e9 for p, v in peaks.items()}


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """The comparisons the targets are stated in: fmlab against the fp32 reference, the HF Trainer, itself."""
    out = {}
    speed = {k: v["per_s"] for k, v in rows.items()}
    pairs = [("fmlab fp32", "reference fp32"), ("fmlab bf16", "reference fp32"), ("fmlab fp32", "HF Trainer fp32"),
             ("fmlab bf16", "HF Trainer bf16"), ("fmlab bf16", "fmlab fp32"), ("fmlab fp32", "raw loop fp32"),
             ("fmlab fp32", "fmlab (bare) fp32")]
    for a, b in pairs:
        if a in speed and b in speed:
            out[f"{a} / {b}"] = speed[a] / speed[b]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="gpt", choices=sorted(WORKLOADS))
    parser.add_argument("--runners", default=None, help="comma-separated name:precision; default: the workload's")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="steps per chunk")
    parser.add_argument("--drop", type=int, default=2, help="first steps of each chunk left out")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the workload's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--logger", default="default", help="fmlab's logger option (default: csv + offline W&B)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--tag", default=None, help="output name; default <workload>-t<threads>")
    parser.add_argument("--rescore", type=Path, default=None, help="add the matmul-peak columns to this result file")
    args = parser.parse_args()
    if args.rescore:
        rescore(args.rescore.resolve())
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    specs = runner_specs(args.runners, workload, args.no_hf)

    made = time.perf_counter()
    cfg, dm, runners, losses = build(args.workload, specs, args.batch_size, args.logger)
    fmlab_task = next((r.task for r in runners.values() if isinstance(r, Fmlab)), None)
    flops = step_flops(fmlab_task, dm) if fmlab_task is not None else None
    first_step, times, chunks = {}, {name: [] for name in runners}, {name: [] for name in runners}
    for name, r in runners.items():  # warm-up chunk; also the time to the first step of a fresh run
        start = time.perf_counter()
        warm = r.run(args.drop + 1)
        first_step[name] = time.perf_counter() - start - sum(warm[1:])
    loads = []
    for _ in range(args.rounds):
        for name, r in runners.items():
            timed = r.run(args.steps)[args.drop :]
            times[name] += timed
            chunks[name].append(float(np.median(timed)) * 1000)
            os.sync()  # a runner's checkpoint writes are flushed before the next runner's chunk, not during it
            loads.append(os.getloadavg()[0])

    block = cfg.model.get("block_size") if workload.unit == "tokens" else 1
    per_step = dm.batch_size * block
    rows = {name: summarize(t, per_step) for name, t in times.items()}
    base = rows.get("reference fp32") or next(iter(rows.values()))
    base_name = next(k for k, v in rows.items() if v is base)
    for name, row in rows.items():
        row["vs_" + base_name.replace(" ", "_")] = base["median_ms"] / row["median_ms"]
        row["first_step_s"] = first_step[name]
        row["chunk_medians_ms"] = [round(t, 1) for t in chunks[name]]  # machine drift shows here, per round
        row["times_ms"] = [round(t * 1000, 1) for t in times[name]]
    peaks = add_mfu(rows, {label(kind, precision): precision for kind, precision in specs}, flops)
    model = {k: v for k, v in to_plain(cfg.model).items() if k != "_target_"}
    built = getattr(fmlab_task.model, "config", None) if fmlab_task is not None else None
    if is_dataclass(built):  # the fields the data set at start (vocab_size from the tokenizer)
        model.update({k: v for k, v in asdict(built).items() if k in model})
    command = f".venv/bin/python {' '.join(['benchmarks/throughput.py', *sys.argv[1:]])}"
    result = {
        "workload": args.workload, "command": command, "train_py": f"train.py {' '.join(workload.overrides)}",
        "model": model, "optimizer": to_plain(cfg.task.optimizer), "scheduler": to_plain(cfg.task.scheduler),
        "horizon_steps": TOTAL_STEPS, "batch_size": dm.batch_size, "unit": workload.unit, "threads": args.threads,
        "rounds": args.rounds, "steps_per_chunk": args.steps, "dropped_per_chunk": args.drop,
        "fmlab_logger": args.logger, "initial_losses": losses, "load_average": {"min": min(loads), "max": max(loads)},
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "hf_optimizer": next((r.optim for r in runners.values() if hasattr(r, "optim")), None),
        "setup_s": time.perf_counter() - made, "flops_per_step": flops, "cpu_matmul_peak_gflops": peaks,
        "results": rows, "ratios": ratios(rows),
    }
    write_report(result, args.tag or f"{args.workload}-t{args.threads}")


def write_report(result: dict, tag: str) -> None:
    """experiments/benchmarks/<tag>.json and the table of it, <tag>.md."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{tag}.json").write_text(json.dumps(result, indent=2))
    rows, load = result["results"], result["load_average"]
    base_name = "reference fp32" if "reference fp32" in rows else next(iter(rows))
    base = rows[base_name]
    lines = [
        f"`{result['command']}`", "",
        f"`{result['train_py']}`, batch {result['batch_size']}, {result['threads']} thread(s), {result['rounds']} "
        f"rounds x {result['steps_per_chunk'] - result['dropped_per_chunk']} timed steps, load "
        f"{load['min']:.2f}-{load['max']:.2f}; initial losses "
        + ", ".join(f"{k} {v:.5f}" for k, v in result["initial_losses"].items()),
        "",
        f"| runner | median ms/step | min | p90 | {result['unit']}/s | vs {base_name} | first step s | "
        "% of matmul peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        mfu = f"{100 * r['of_matmul_peak']:.0f}" if "of_matmul_peak" in r else "–"
        lines.append(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['p90_ms']:.1f} | {r['per_s']:.0f} | "
                     f"{base['median_ms'] / r['median_ms']:.3f}x | {r['first_step_s']:.2f} | {mfu} |")
    if peaks := result.get("cpu_matmul_peak_gflops"):
        lines += ["", f"Training FLOPs per step {result['flops_per_step'] / 1e9:.1f} G; this CPU's best matmul on "
                  f"{result['threads']} thread(s): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items())]
    if note := result.get("rescored"):
        lines += ["", note]
    lines += ["", *(f"- {k}: {v:.3f}x" for k, v in result["ratios"].items())]
    (OUT / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def rescore(path: Path) -> None:
    """Add the MFU columns to an earlier result file, its timings kept: the FLOPs per step from the model its
    workload's config builds (for tasks that leave the count to the model), the CPU peak measured now."""
    if not path.is_file():
        raise SystemExit(f"error: --rescore {path}: no such file; give a result JSON from experiments/benchmarks/")
    result = json.loads(path.read_text())
    workload = WORKLOADS[result["workload"]]
    cfg = compose_train_config(workload.overrides, WORKDIR)
    task_class = hydra.utils.get_class(cfg.task._target_)
    if any(hasattr(task_class, f"flops_per_{unit}") for unit in ("batch", "sample")):
        raise SystemExit(f"error: --rescore {path}: {task_class.__name__} counts its FLOPs from a batch; rerun the "
                         "workload instead")
    model = build_model({**to_plain(cfg.model), **result["model"]})
    flops = float(model.flops_per_sample() * result["batch_size"])
    torch.set_num_threads(result["threads"])
    precisions = {name: next(p for p, short in PRECISIONS.items() if name.endswith(short))
                  for name in result["results"]}
    result["flops_per_step"] = flops
    result["cpu_matmul_peak_gflops"] = add_mfu(result["results"], precisions, flops)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    result["rescored"] = (f"Matmul peak measured {time.strftime('%Y-%m-%d')} by `benchmarks/throughput.py --rescore "
                          f"{shown}`; step times from the run above.")
    write_report(result, path.stem)

if __name__ == "__main__":
    main()

"""Training-step throughput of fmlab against a raw PyTorch loop and the Hugging Face Trainer.

Each workload is composed from conf/ exactly as `python train.py` composes it (model, task, optimizer, data), then
trained three ways on the same data with the same initial weights, optimizer settings, schedule, gradient
clipping and precision:

- fmlab: the task under a Lightning Trainer with the default callbacks and a CSV logger;
- raw loop: the identical model and loss in a hand-written loop (the floor fmlab is measured against);
- HF Trainer: `transformers.Trainer` on the same shape (`GPT2LMHeadModel`, `BertForMaskedLM`); none for MAE.

They run interleaved in one process (A-B-C-A-B-C...) after a warm-up chunk, so drift in machine load hits all of
them alike. Per-step wall times come from the step boundaries each framework reports; the first steps of every
chunk are left out.

    .venv/bin/python benchmarks/throughput.py --workload gpt --precision bf16-mixed
    .venv/bin/python benchmarks/throughput.py --workload bert --precision 32 --threads 1
    .venv/bin/python benchmarks/throughput.py --workload mae
    .venv/bin/python benchmarks/throughput.py --workload tiny   # micro GPT: fmlab's own overhead in ms/step

Writes experiments/benchmarks/<workload>-<precision>-t<threads>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fmlab.config import compose_train_config
from fmlab.tasks.base import to_plain
from fmlab.tasks.masked_lm import mask_tokens
from fmlab.training import build_datamodule, build_task, run_pretrained

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "benchmarks"
WORKDIR = Path(tempfile.gettempdir()) / "fmlab-bench"
TOTAL_STEPS = 10_000  # the schedule's horizon: every chunk stays in its flat early part after warm-up


@dataclass
class Workload:
    """A `train.py` command line (as overrides) and how the raw loop computes its loss."""

    overrides: list[str]
    raw_loss: Callable[[nn.Module, Any], torch.Tensor]
    hf_model: Callable[[DictConfig, Any], tuple[nn.Module, Dataset, Any]] | None = None
    unit: str = "tokens"
    competitors: tuple[str, ...] = ("raw loop", "fmlab", "HF Trainer")


def gpt_loss(task: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return task.model(batch[:, :-1], batch[:, 1:])[1]


def mlm_loss(task: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    t = task.tokens()  # mask id and special-token table of the run's tokenizer
    ids = batch[:, : task.model.config.block_size]
    inputs, targets = mask_tokens(ids, t["mask_id"], t["special"], task.model.config.vocab_size, task.mask_prob)
    return task.model(inputs, targets)[1]


def mae_loss(task: nn.Module, batch: dict) -> torch.Tensor:
    return task(batch["pixel_values"])[0]  # the MAE task module is the model: ViT encoder + decoder


class Windows(Dataset):
    """Packed token windows as HF Trainer examples."""

    def __init__(self, windows: Dataset, length: int, labels: bool) -> None:
        self.windows, self.length, self.labels = windows, length, labels

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        x = self.windows[i][: self.length].long()
        return {"input_ids": x, "labels": x} if self.labels else {"input_ids": x}


def hf_gpt2(cfg: DictConfig, dm: Any) -> tuple[nn.Module, Dataset, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg.model
    config = GPT2Config(
        vocab_size=dm.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
        resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout, activation_function="gelu_new",
    )
    # GPT2LMHeadModel shifts the labels itself.
    return GPT2LMHeadModel(config), Windows(dm.train_set, m.block_size, labels=True), None


def hf_bert(cfg: DictConfig, dm: Any) -> tuple[nn.Module, Dataset, Any]:
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    m = cfg.model
    config = BertConfig(
        vocab_size=dm.vocab_size, hidden_size=m.n_embd, num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
        intermediate_size=4 * m.n_embd, max_position_embeddings=m.block_size, type_vocab_size=m.type_vocab_size,
        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.attn_dropout, layer_norm_eps=m.norm_eps,
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(dm.describe().state["tokenizer"]), mask_token="<mask>", pad_token="<pad>",
        cls_token="<cls>", sep_token="<sep>",
    )
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=cfg.task.mask_prob)  # the 80/10/10 rule too
    return BertForMaskedLM(config), Windows(dm.train_set, m.block_size, labels=False), collator


GPT_SHAPE = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384"]
WORKLOADS = {
    # nanoGPT-like: 6 layers, width 384, block 256; batch 8 x 256 tokens.
    "gpt": Workload(["model=gpt", "stage=pretrain", *GPT_SHAPE, "model.block_size=256", "data.batch_size=8"],
                    gpt_loss, hf_gpt2),
    # BERT-style post-LN encoder of the same width and depth; batch 16 x 128 tokens, 15 % masked.
    "bert": Workload(["model=bert", "stage=pretrain", *GPT_SHAPE, "model.block_size=128", "data.batch_size=16"],
                     mlm_loss, hf_bert),
    # The label-efficiency experiment's MAE: the default small ViT on Fashion-MNIST, batch 128.
    "mae": Workload(["model=vit", "stage=pretrain"], mae_loss, unit="images", competitors=("raw loop", "fmlab")),
    # Micro model: the step is almost all framework; fmlab with (default) and without callbacks and logger.
    "tiny": Workload(
        ["model=gpt", "stage=pretrain", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
         "data.batch_size=8"], gpt_loss, competitors=("raw loop", "fmlab (bare)", "fmlab"),
    ),
}


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


class LightningTimer(L.Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_start(self, trainer, pl_module) -> None:
        self.timer.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.timer.step()


class Fmlab:
    """The composed task under a Lightning Trainer, with or without the default callbacks and loggers."""

    def __init__(self, task: L.LightningModule, dm: Any, cfg: DictConfig, extras: bool) -> None:
        self.task, self.dm, self.cfg, self.extras = task, dm, cfg, extras
        self.name = "fmlab" if extras else "fmlab (bare)"
        self.timer = StepTimer()

    def run(self, steps: int) -> list[float]:
        self.timer.times = []
        callbacks: list = [LightningTimer(self.timer)]
        loggers: list | bool = False
        if self.extras:  # what `python train.py` turns on by default, minus W&B's background process
            from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
            from lightning.pytorch.loggers import CSVLogger

            shutil.rmtree(WORKDIR / "fmlab", ignore_errors=True)  # each chunk checkpoints; keep only the last
            callbacks += [RichProgressBar(), ModelCheckpoint(dirpath=WORKDIR / "fmlab" / "ckpt", save_last=True)]
            loggers = [CSVLogger(WORKDIR / "fmlab", name="csv")]
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision=self.cfg.trainer.precision, max_steps=steps,
            limit_val_batches=0, gradient_clip_val=self.cfg.trainer.gradient_clip_val, callbacks=callbacks,
            logger=loggers, enable_checkpointing=self.extras, enable_progress_bar=self.extras,
            enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(self.task, datamodule=self.dm)
        return self.timer.times


class RawLoop:
    """The same model and loss in a hand-written loop over a plain shuffled DataLoader."""

    name = "raw loop"

    def __init__(self, task: nn.Module, dm: Any, cfg: DictConfig, loss: Callable) -> None:
        self.task, self.loss, self.cfg = task, loss, cfg
        self.opt, self.sched = task.build_optimizer(TOTAL_STEPS)  # the task's own AdamW and schedule
        collate = dm.train_dataloader().collate_fn  # the data module's own batching (images: batched transforms)
        self.loader = DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=True, drop_last=True,
                                 collate_fn=collate)

    def run(self, steps: int) -> list[float]:
        timer = StepTimer()
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.cfg.trainer.precision == "bf16-mixed"
                    else contextlib.nullcontext())
        clip = self.cfg.trainer.gradient_clip_val
        timer.start()
        batches = iter(self.loader)
        self.task.train()
        for _ in range(steps):
            batch = next(batches)
            with autocast:
                loss = self.loss(self.task, batch)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.task.parameters(), clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            timer.step()
        return timer.times


class HFTrainer:
    """`transformers.Trainer` (its defaults, e.g. fused AdamW) on the Hugging Face model of the same shape."""

    name = "HF Trainer"

    def __init__(self, cfg: DictConfig, dm: Any, make_model: Callable) -> None:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        torch.manual_seed(0)
        model, dataset, collator = make_model(cfg, dm)
        self.timer = timer = StepTimer()

        class Timing(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.start()

            def on_step_end(self, args, state, control, **kw):
                timer.step()

        opt, sched = cfg.task.optimizer, cfg.task.scheduler
        self.make = lambda steps: Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(WORKDIR / "hf"), max_steps=steps, per_device_train_batch_size=dm.batch_size,
                learning_rate=opt.lr, adam_beta1=opt.betas[0], adam_beta2=opt.betas[1],
                weight_decay=opt.weight_decay, warmup_steps=sched.get("warmup_steps") or 0,
                lr_scheduler_type="cosine", max_grad_norm=cfg.trainer.gradient_clip_val,
                bf16=cfg.trainer.precision == "bf16-mixed", use_cpu=True, save_strategy="no", report_to=[],
                logging_steps=10_000, dataloader_num_workers=0, disable_tqdm=True, seed=0,
            ),
            train_dataset=dataset, data_collator=collator, callbacks=[Timing()],
        )

    def run(self, steps: int) -> list[float]:
        self.timer.times = []
        self.make(steps).train()
        return self.timer.times


def summarize(times: list[float], per_step: int) -> dict:
    ms = np.array(times) * 1000
    median = float(np.median(ms))
    return {"steps": len(ms), "median_ms": median, "min_ms": float(ms.min()),
            "p90_ms": float(np.percentile(ms, 90)), "per_s": per_step / (median / 1000)}


def build(workload: Workload, precision: str, batch_size: int | None) -> tuple[DictConfig, Any, list]:
    """Compose the workload, build its data once and every competitor from the same initial weights."""
    overrides = [*workload.overrides, f"trainer.precision={precision}", "logger=csv"]
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

    competitors: list = []
    for name in workload.competitors:
        if name == "raw loop":
            competitors.append(RawLoop(task(), dm, cfg, workload.raw_loss))
        elif name.startswith("fmlab"):
            competitors.append(Fmlab(task(), dm, cfg, extras=name == "fmlab"))
        elif workload.hf_model is not None:
            competitors.append(HFTrainer(cfg, dm, workload.hf_model))
    return cfg, dm, competitors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="gpt", choices=sorted(WORKLOADS))
    parser.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="steps per chunk")
    parser.add_argument("--drop", type=int, default=2, help="first steps of each chunk left out")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the workload's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    workload = WORKLOADS[args.workload]
    if args.no_hf:
        workload.competitors = tuple(c for c in workload.competitors if c != "HF Trainer")

    made = time.perf_counter()
    cfg, dm, competitors = build(workload, args.precision, args.batch_size)
    first_step, times = {}, {c.name: [] for c in competitors}
    for c in competitors:  # warm-up chunk; also the time to the first step of a fresh run
        start = time.perf_counter()
        warm = c.run(args.drop + 1)
        first_step[c.name] = time.perf_counter() - start - sum(warm[1:])
    loads = []
    for _ in range(args.rounds):
        for c in competitors:
            times[c.name] += c.run(args.steps)[args.drop :]
            os.sync()  # a runner's checkpoint writes are flushed before the next runner's chunk, not during it
            loads.append(os.getloadavg()[0])

    block = cfg.model.get("block_size") if workload.unit == "tokens" else 1
    per_step = dm.batch_size * block
    rows = {name: summarize(t, per_step) for name, t in times.items()}
    raw = rows["raw loop"]["median_ms"]
    for name, row in rows.items():
        row["vs_raw"] = raw / row["median_ms"]
        row["overhead_ms"] = row["median_ms"] - raw
        row["first_step_s"] = first_step[name]
    model = {k: v for k, v in to_plain(cfg.model).items() if k != "_target_"}
    result = {
        "workload": args.workload, "command": f"train.py {' '.join(workload.overrides)}", "model": model,
        "optimizer": to_plain(cfg.task.optimizer), "precision": args.precision, "batch_size": dm.batch_size,
        "unit": workload.unit, "threads": args.threads, "rounds": args.rounds, "steps_per_chunk": args.steps,
        "dropped_per_chunk": args.drop, "load_average": {"min": min(loads), "max": max(loads)},
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "setup_s": time.perf_counter() - made, "results": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"{args.workload}-{args.precision}-t{args.threads}"
    (OUT / f"{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"`{result['command']}`, batch {dm.batch_size}, {args.precision}, {args.threads} thread(s), "
        f"{args.rounds} rounds x {args.steps - args.drop} timed steps, load {min(loads):.2f}-{max(loads):.2f}",
        "",
        f"| runner | median ms/step | min | p90 | {workload.unit}/s | vs raw loop | overhead ms | first step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['p90_ms']:.1f} | {r['per_s']:.0f} | "
            f"{r['vs_raw']:.3f}x | {r['overhead_ms']:+.1f} | {r['first_step_s']:.2f} |"
        )
    (OUT / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

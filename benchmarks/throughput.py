"""Training-step throughput of fmlab against a raw PyTorch loop and the Hugging Face Trainer.

The competitors train the same GPT shape on the same memory-mapped BBC News tokens with the same optimizer,
schedule, gradient clipping, seed and precision. They run interleaved in one process (A-B-C-A-B-C...) after a
warm-up, so drift in machine load hits all of them alike. Per-step wall times come from the step boundaries
each framework reports; the first steps of every chunk are dropped.

    .venv/bin/python benchmarks/throughput.py --precision bf16-mixed --rounds 4 --steps 12
    .venv/bin/python benchmarks/throughput.py --tiny      # micro model: framework overhead in ms/step

Writes a JSON and a Markdown table to experiments/benchmarks/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fmlab.data.text_corpus import PackedWindows, TextCorpusDataModule
from fmlab.models.gpt import GPTConfig
from fmlab.tasks.base import param_groups, warmup_cosine
from fmlab.tasks.causal_lm import CausalLMTask

OUT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"
SHAPES = {
    "gpt": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, activation="gelu_tanh"),
    "tiny": dict(n_layer=1, n_head=2, n_embd=32, block_size=32, activation="gelu_tanh"),
}
LR, BETAS, WD, WARMUP, TOTAL = 6e-4, (0.9, 0.95), 0.1, 10, 10_000


class StepTimer:
    """Collects wall time between consecutive step ends."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.last: float | None = None
        self.first_step_at: float | None = None

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


def autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Fmlab:
    """fmlab's CausalLMTask under a Lightning Trainer, with or without the default callbacks and loggers."""

    def __init__(self, shape: dict, dm: TextCorpusDataModule, precision: str, batch_size: int, extras: bool):
        torch.manual_seed(0)
        model_cfg = {"_target_": "fmlab.models.gpt.GPTConfig", "vocab_size": dm.vocab_size, **shape}
        self.task = CausalLMTask(
            model_cfg,
            {"_target_": "torch.optim.AdamW", "lr": LR, "betas": list(BETAS), "weight_decay": WD},
            {"warmup_steps": WARMUP, "min_lr_ratio": 0.1},
        )
        self.dm, self.precision, self.extras = dm, precision, extras
        self.dm.batch_size = batch_size
        self.timer = StepTimer()
        self.name = "fmlab" + ("" if extras else " (bare)")
        self.workdir = Path(os.environ.get("TMPDIR", "/tmp")) / "fmlab-bench"

    def run(self, steps: int) -> list[float]:
        self.timer.times = []
        callbacks: list = [LightningTimer(self.timer)]
        loggers: list | bool = False
        if self.extras:  # what `python train.py` turns on by default, minus W&B's background process
            from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
            from lightning.pytorch.loggers import CSVLogger

            callbacks += [RichProgressBar(), ModelCheckpoint(dirpath=self.workdir / "ckpt", save_last=True)]
            loggers = [CSVLogger(self.workdir, name="csv")]
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision=self.precision, max_steps=steps, limit_val_batches=0,
            gradient_clip_val=1.0, callbacks=callbacks, logger=loggers, enable_checkpointing=self.extras,
            enable_progress_bar=self.extras, enable_model_summary=False, num_sanity_val_steps=0,
        )
        trainer.fit(self.task, datamodule=self.dm)
        return self.timer.times


class RawLoop:
    """The same model and data in a hand-written loop: the floor fmlab is measured against."""

    name = "raw loop"

    def __init__(self, shape: dict, dm: TextCorpusDataModule, precision: str, batch_size: int):
        torch.manual_seed(0)
        self.model = GPTConfig(vocab_size=dm.vocab_size, **shape).build()
        self.opt = torch.optim.AdamW(param_groups(self.model, WD), lr=LR, betas=BETAS)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(WARMUP, TOTAL, 0.1))
        self.loader = DataLoader(dm.train_set, batch_size=batch_size, shuffle=True, drop_last=True)
        self.precision = precision

    def run(self, steps: int) -> list[float]:
        timer = StepTimer()
        timer.start()
        batches = iter(self.loader)
        self.model.train()
        for _ in range(steps):
            batch = next(batches)
            with autocast(self.precision):
                _, loss = self.model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            timer.step()
        return timer.times


class HFWindows(Dataset):
    def __init__(self, windows: PackedWindows) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict:
        x = self.windows[i][:-1]
        return {"input_ids": x, "labels": x}  # GPT2LMHeadModel shifts the labels itself


class HFTrainer:
    """`transformers.Trainer` on a `GPT2LMHeadModel` of the same shape."""

    name = "HF Trainer"

    def __init__(self, shape: dict, dm: TextCorpusDataModule, precision: str, batch_size: int):
        from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

        torch.manual_seed(0)
        config = GPT2Config(
            vocab_size=dm.vocab_size, n_positions=shape["block_size"], n_embd=shape["n_embd"],
            n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
        self.timer = StepTimer()
        timer = self.timer

        class Timing(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.start()

            def on_step_end(self, args, state, control, **kw):
                timer.step()

        self.make = lambda steps: Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "hf-bench"), max_steps=steps,
                per_device_train_batch_size=batch_size, learning_rate=LR, adam_beta1=BETAS[0],
                adam_beta2=BETAS[1], weight_decay=WD, warmup_steps=WARMUP, lr_scheduler_type="cosine",
                max_grad_norm=1.0, bf16=precision == "bf16-mixed", use_cpu=True, save_strategy="no",
                report_to=[], logging_steps=10_000, dataloader_num_workers=0, disable_tqdm=True, seed=0,
            ),
            train_dataset=HFWindows(dm.train_set),
            callbacks=[Timing()],
        )

    def run(self, steps: int) -> list[float]:
        self.timer.times = []
        self.make(steps).train()
        return self.timer.times


def summarize(times: list[float], tokens_per_step: int) -> dict:
    ms = np.array(times) * 1000
    return {
        "steps": len(ms),
        "median_ms": float(np.median(ms)),
        "min_ms": float(ms.min()),
        "p90_ms": float(np.percentile(ms, 90)),
        "tokens_per_s": tokens_per_step / (float(np.median(ms)) / 1000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12, help="steps per chunk")
    parser.add_argument("--drop", type=int, default=2, help="first steps of each chunk left out")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="micro model: fmlab with and without extras vs raw")
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    shape = SHAPES["tiny" if args.tiny else "gpt"]

    dm = TextCorpusDataModule(source="bbc_news", vocab_size=8192, block_size=shape["block_size"], batch_size=8)
    dm.prepare_data()
    dm.setup()

    made = time.perf_counter()
    competitors: list = [RawLoop(shape, dm, args.precision, args.batch_size)]
    if args.tiny:
        competitors += [Fmlab(shape, dm, args.precision, args.batch_size, extras=e) for e in (False, True)]
    else:
        competitors.append(Fmlab(shape, dm, args.precision, args.batch_size, extras=True))
        if not args.no_hf:
            competitors.append(HFTrainer(shape, dm, args.precision, args.batch_size))

    first_step, times = {}, {c.name: [] for c in competitors}
    for c in competitors:  # warm-up chunk; also the time to the first step of a fresh run
        start = time.perf_counter()
        warm = c.run(args.drop + 1)
        first_step[c.name] = time.perf_counter() - start - sum(warm[1:])
    loads = []
    for _ in range(args.rounds):
        for c in competitors:
            times[c.name] += c.run(args.steps)[args.drop :]
            loads.append(os.getloadavg()[0])

    tokens = args.batch_size * shape["block_size"]
    rows = {name: summarize(t, tokens) for name, t in times.items()}
    raw = rows["raw loop"]["median_ms"]
    for name, row in rows.items():
        row["vs_raw_tokens_per_s"] = raw / row["median_ms"]
        row["overhead_ms"] = row["median_ms"] - raw
        row["first_step_s"] = first_step[name]
    result = {
        "model": shape, "precision": args.precision, "batch_size": args.batch_size, "threads": args.threads,
        "rounds": args.rounds, "steps_per_chunk": args.steps, "dropped_per_chunk": args.drop,
        "load_average": {"min": min(loads), "max": max(loads)}, "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "setup_s": time.perf_counter() - made, "results": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    tag = f"{'tiny' if args.tiny else 'gpt'}-{args.precision}-t{args.threads}"
    (OUT / f"{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"GPT {shape}, batch {args.batch_size}, {args.precision}, {args.threads} threads, "
        f"{args.rounds} rounds x {args.steps - args.drop} timed steps, load {min(loads):.2f}-{max(loads):.2f}",
        "",
        "| runner | median ms/step | min | p90 | tokens/s | vs raw loop | overhead ms | first step s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['p90_ms']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['vs_raw_tokens_per_s']:.3f}x | {r['overhead_ms']:+.1f} | {r['first_step_s']:.2f} |"
        )
    (OUT / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""A new model family is one class and one config: a toy causal model, defined here, trains through train.py with
nothing else added (the README's "Add a model family" recipe)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fmlab.models.backbone import Backbone
from fmlab.models.transformer import TransformerConfig
from tests.conftest import read_metrics, values

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ToyConfig(TransformerConfig):
    presets: ClassVar[dict] = {"toy": {"n_layer": 1, "n_head": 1, "n_embd": 32}}
    vocab_size: int = 300
    block_size: int = 32

    def build(self) -> Toy:
        return Toy(self)


class Toy(Backbone):
    """Causal running mean of token embeddings, one MLP, a tied output layer."""

    input_names = ("input_ids",)
    embedding_names = ("wte",)

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, config.n_embd), nn.GELU())

    def encode(self, input_ids: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids).cumsum(1) / torch.arange(1, input_ids.size(1) + 1, device=input_ids.device)[:, None]
        return self.mlp(x)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.encode(input_ids) @ self.wte.weight.t()
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def sequence_length(self) -> int:
        return self.config.block_size


def test_a_family_defined_in_a_test_file_trains_through_train_py(tmp_path: Path, corpus_dir: Path) -> None:
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "toy.yaml").write_text(
        "_target_: tests.test_toy_family.ToyConfig\nsize: toy\nvocab_size: 300\nblock_size: 32\n"
        "n_layer: ${fmlab.preset:n_layer}\nn_head: ${fmlab.preset:n_head}\nn_embd: ${fmlab.preset:n_embd}\n"
    )
    run = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", "model=toy", "task=causal_lm", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "data=text_files", f"data.source={corpus_dir}", "data.vocab_size=300", "data.batch_size=8",
        f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}", "trainer.accelerator=cpu",
        "trainer.devices=1", "trainer.precision=32", "trainer.max_steps=40", "trainer.val_check_interval=20",
        "task.optimizer.lr=3e-2", "task.scheduler.warmup_steps=5", "logger=csv", "callbacks=[model_checkpoint]",
        "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = values(read_metrics(run), "val/loss")
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5, losses
    assert (run / "checkpoints" / "last.ckpt").is_file()

"""Throughput and MFU: the GPT FLOPs hook and the callback's numbers against a hand computation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from fmlab.callbacks import Throughput
from fmlab.callbacks.throughput import device_peak_flops, measure_matmul_flops, throughput_metrics
from fmlab.data.text_corpus import TextCorpusDataModule
from fmlab.models.gpt import GPTConfig
from fmlab.tasks.causal_lm import CausalLMTask
from tests.conftest import write_corpus

L_, C, T, V = 2, 32, 32, 300  # layers, width, context, vocabulary


def hand_flops_per_token(vocab: int) -> int:
    per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = L_ * per_layer + 2 * C + vocab * C  # blocks, final LayerNorm, tied embedding / LM head (no position table)
    return 6 * n + 12 * L_ * C * T


def test_gpt_flops_per_token_matches_hand_count() -> None:
    model = GPTConfig(n_layer=L_, n_head=2, n_embd=C, block_size=T, vocab_size=V).build()
    assert model.flops_per_token() == hand_flops_per_token(V)
    assert model.flops_per_sample() == hand_flops_per_token(V) * T
    assert model.tokens_per_sample() == T


def test_peak_table_uses_dense_figures_and_knows_plain_h200() -> None:
    assert device_peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    assert device_peak_flops("NVIDIA H200 NVL", "bf16-mixed") == 989e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe", "16-mixed") == 756e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 19.5e12
    assert device_peak_flops("NVIDIA H100 80GB HBM3", 32) == 67e12
    assert device_peak_flops("Some Future GPU", "bf16-mixed") is None


def test_throughput_metrics_by_hand() -> None:
    m = throughput_metrics(samples=64, seconds=2.0, world_size=2, flops_per_sample=1e9, peak_flops=1e11,
                           tokens_per_sample=128)
    assert m["perf/samples_per_sec"] == 64.0  # 32/s per device, 2 devices
    assert m["perf/tokens_per_sec"] == 64.0 * 128
    assert m["perf/mfu"] == pytest.approx(32 * 1e9 / 1e11)


def test_cpu_matmul_measure_leaves_training_rng_alone() -> None:
    state = torch.get_rng_state()
    assert measure_matmul_flops(n=64, seconds=0.01) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_callback_logs_hand_computed_mfu(tmp_path: Path) -> None:
    """Each optimizer step takes 2 s of a fake clock; batch 8, peak 1 GFLOP/s."""
    now = {"t": 0.0}

    class Tick(L.Callback):  # runs before Throughput in each hook: the step's time has passed
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now["t"] = 2.0 * trainer.global_step

    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    data = TextCorpusDataModule(source=str(corpus), vocab_size=V, block_size=T, batch_size=8,
                                cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    model = {"_target_": "fmlab.models.gpt.GPTConfig", "n_layer": L_, "n_head": 2, "n_embd": C, "block_size": T,
             **data.describe().model}
    task = CausalLMTask(model, {"_target_": "torch.optim.AdamW", "lr": 1e-3}, {"warmup_steps": 1})
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=32, max_steps=4, log_every_n_steps=2, limit_val_batches=0,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=""), default_root_dir=tmp_path,
        callbacks=[Tick(), Throughput(peak_flops=1e9, clock=lambda: now["t"])],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(task, datamodule=data)

    per_sample = hand_flops_per_token(data.vocab_size) * T
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("perf/mfu")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert float(r["perf/samples_per_sec"]) == pytest.approx(4.0)  # 8 samples per 2 s
        assert float(r["perf/tokens_per_sec"]) == pytest.approx(4.0 * T)
        assert float(r["perf/mfu"]) == pytest.approx(4.0 * per_sample / 1e9)
    summary = json.loads((tmp_path / "throughput.json").read_text())
    assert summary["steps"] == 4 and summary["samples"] == 32 and summary["tokens"] == 32 * T
    assert summary["train_seconds"] == pytest.approx(8.0)
    assert summary["mfu"] == pytest.approx(4.0 * per_sample / 1e9)


def test_bert_vit_and_mae_flops_by_hand() -> None:
    from fmlab.models.bert import BertConfig
    from fmlab.models.vit import ViTConfig
    from fmlab.tasks.mae import MAETask

    bert = BertConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, n_embd=8).build()
    weights = sum(p.numel() for n, p in bert.named_parameters() if n not in ("wpe.weight", "wtt.weight"))
    assert bert.flops_per_sample() == (6 * weights + 12 * 2 * 8 * 16) * 16

    vit_cfg = dict(img_size=28, patch_size=4, in_chans=1, n_layer=2, n_head=2, n_embd=8, pos_embed="learned")
    vit = ViTConfig(**vit_cfg).build()
    weights = sum(p.numel() for n, p in vit.named_parameters() if n != "pos_embed")
    assert vit.sample_unit == "images"
    assert vit.flops_per_sample() == (6 * weights + 12 * 2 * 8 * 50) * 50  # 49 patches + CLS

    optim = {"_target_": "torch.optim.AdamW", "lr": 1e-3}
    mae = MAETask({"_target_": "fmlab.models.vit.ViTConfig", **vit_cfg}, optim, {}, mask_ratio=0.75,
                  decoder={"n_embd": 4, "n_layer": 1, "n_head": 1})
    decoder_weights = sum(p.numel() for p in mae.decoder.parameters())
    visible = 49 - 36 + 1  # the encoder sees a quarter of the patches, plus CLS
    expected = (6 * weights + 12 * 2 * 8 * visible) * visible + (6 * decoder_weights + 12 * 1 * 4 * 50) * 50
    assert mae.flops_per_sample() == expected
    assert mae.flops_per_sample() < vit.flops_per_sample() + (6 * decoder_weights + 12 * 4 * 50) * 50

"""Throughput and MFU: FLOP hooks and the callback's numbers against a hand computation, the CPU peak, the
MFU cap (FLOP counts against torch's own counter: tests/test_flops.py)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fmlab.callbacks import Throughput, throughput
from fmlab.callbacks.throughput import device_peak_flops, matmul_dtype, measure_matmul_flops, throughput_metrics
from fmlab.data.text_corpus import TextCorpusDataModule
from fmlab.models.gpt import GPTConfig
from fmlab.tasks.causal_lm import CausalLMTask
from tests.conftest import write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on shared cores
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
    m = throughput_metrics(samples=64, seconds=2.0, world_size=2, flops=64e9, peak_flops=1e11, tokens=64 * 128)
    assert m["perf/samples_per_sec"] == 64.0  # 32/s per device, 2 devices
    assert m["perf/tokens_per_sec"] == 64.0 * 128
    assert m["perf/tflops_per_device"] == pytest.approx(32e9 / 1e12)
    assert m["perf/mfu"] == pytest.approx(32 * 1e9 / 1e11)


def test_mfu_is_unknown_rather_than_above_100_percent() -> None:
    assert throughput_metrics(10, 1.0, flops=1e11, peak_flops=1e11)["perf/mfu"] == 1.0
    over = throughput_metrics(10, 1.0, flops=1.1e11, peak_flops=1e11)
    assert "perf/mfu" not in over and over["perf/tflops_per_device"] == pytest.approx(0.11)


def test_cpu_matmul_measure_leaves_training_rng_alone() -> None:
    state = torch.get_rng_state()
    assert measure_matmul_flops(n=64, seconds=0.01) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_cpu_peak_is_the_best_of_repetitions_at_the_runs_dtype(monkeypatch) -> None:
    times = iter([0.0, 0.0, 1.0, 1.0, 1.5, 1.5, 3.5, 3.5])  # products of 1.0, 0.5 and 2.0 s on a fake clock
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(times))
    assert measure_matmul_flops(n=8, seconds=0.0, repeats=3) == 2 * 8**3 / 0.5
    assert matmul_dtype("bf16-mixed") == torch.bfloat16 and matmul_dtype("16-mixed") == torch.float16
    assert matmul_dtype(32) == torch.float32 and matmul_dtype("32-true") == torch.float32

    measured = []
    monkeypatch.setattr(throughput, "_CPU_PEAKS", {})
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda *args: measured.append(args) or args[1] * 1e9)
    callback = Throughput(cpu_peak_sizes=(128, 64), cpu_peak_seconds=0.2)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    for _ in range(2):
        assert callback._device_peak(SimpleNamespace(precision="bf16-mixed"), cpu) == 128e9, "the best size"
    assert measured == [(torch.bfloat16, 128, 0.1), (torch.bfloat16, 64, 0.1)], "once per process, in bf16"


OPTIM, SCHEDULE = {"_target_": "torch.optim.AdamW", "lr": 1e-3}, {"warmup_steps": 1}


def fit_with_fake_clock(tmp_path: Path, task: L.LightningModule, peak_flops: float, **data) -> None:
    """Four optimizer steps of 2 s each on a fake clock, throughput logged every 2 steps."""
    now = {"t": 0.0}

    class Tick(L.Callback):  # runs before Throughput in each hook: the step's time has passed
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now["t"] = 2.0 * trainer.global_step

    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=32, max_steps=4, log_every_n_steps=2, limit_val_batches=0,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=""), default_root_dir=tmp_path,
        callbacks=[Tick(), Throughput(peak_flops=peak_flops, clock=lambda: now["t"])],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(task, **data)


def gpt_task(tmp_path: Path) -> tuple[CausalLMTask, TextCorpusDataModule]:
    corpus = write_corpus(tmp_path / "corpus", n_docs=20)
    data = TextCorpusDataModule(source=str(corpus), vocab_size=V, block_size=T, batch_size=8,
                                cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    model = {"_target_": "fmlab.models.gpt.GPTConfig", "n_layer": L_, "n_head": 2, "n_embd": C, "block_size": T,
             **data.describe().model}
    return CausalLMTask(model, OPTIM, SCHEDULE), data


def perf_rows(tmp_path: Path) -> list[dict]:
    with open(tmp_path / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("perf/samples_per_sec")]


def test_callback_logs_hand_computed_mfu(tmp_path: Path) -> None:
    """Each optimizer step takes 2 s of a fake clock; batch 8, peak 1 GFLOP/s."""
    task, data = gpt_task(tmp_path)
    fit_with_fake_clock(tmp_path, task, 1e9, datamodule=data)

    per_sample = hand_flops_per_token(data.vocab_size) * T
    rows = perf_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert float(r["perf/samples_per_sec"]) == pytest.approx(4.0)  # 8 samples per 2 s
        assert float(r["perf/tokens_per_sec"]) == pytest.approx(4.0 * T)
        assert float(r["perf/mfu"]) == pytest.approx(4.0 * per_sample / 1e9)
    summary = json.loads((tmp_path / "throughput.json").read_text())
    assert summary["steps"] == 4 and summary["samples"] == 32 and summary["tokens"] == 32 * T
    assert summary["train_seconds"] == pytest.approx(8.0)
    assert summary["mfu"] == pytest.approx(4.0 * per_sample / 1e9)
    assert summary["flops_per_sample"] == per_sample


def test_callback_reports_mfu_unknown_when_the_peak_is_exceeded(tmp_path: Path, caplog) -> None:
    task, data = gpt_task(tmp_path)
    with caplog.at_level(logging.INFO, logger="fmlab.callbacks.throughput"):
        fit_with_fake_clock(tmp_path, task, 1e3, datamodule=data)  # far below the achieved ~30 MFLOP/s
    rows = perf_rows(tmp_path)
    assert [int(r["step"]) for r in rows] == [2, 4] and not any(r.get("perf/mfu") for r in rows)
    assert all(float(r["perf/tflops_per_device"]) > 1e3 / 1e12 for r in rows)
    summary = json.loads((tmp_path / "throughput.json").read_text())
    assert "mfu" not in summary
    assert sum("no upper bound" in r.message for r in caplog.records) == 1, "one warning, not one per window"
    assert any("MFU unknown" in r.message for r in caplog.records if r.message.startswith("Throughput:"))


def test_fine_tuning_counts_each_batch_at_its_padded_length(tmp_path: Path) -> None:
    """Batches of 8 texts padded to 6, 10, 6 and 10 tokens (block_size 32): FLOPs and tokens of those shapes."""
    from fmlab.tasks.classification import ClassificationTask

    model = {"_target_": "fmlab.models.bert.BertConfig", "vocab_size": 100, "block_size": T, "n_layer": L_,
             "n_head": 2, "n_embd": C}
    task = ClassificationTask(model, OPTIM, SCHEDULE, num_labels=2, finetune_mode="lora")
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, 100, (8, n), generator=gen), "attention_mask": torch.ones(8, n),
                "labels": torch.randint(2, (8,), generator=gen)} for n in (6, 10, 6, 10)]
    expected = sum(task.flops_per_batch(b) for b in batches)
    fit_with_fake_clock(tmp_path, task, 1e12, train_dataloaders=DataLoader(batches, batch_size=None))

    summary = json.loads((tmp_path / "throughput.json").read_text())
    assert summary["samples"] == 32 and summary["tokens"] == 8 * (6 + 10 + 6 + 10)
    assert summary["flops_per_sample"] == pytest.approx(expected / 32)
    assert summary["flops_per_sample"] < task.flops_per_sample() / 3, "not block_size (32) tokens per sample"
    assert summary["tflops_per_device"] == pytest.approx(expected / 8.0 / 1e12)


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
    patch = 16 * 8 + 8  # the 4 x 4 patch projection to width 8: on all 49 patches, no input gradient
    blocks = weights - patch
    proj_in, pred = 8 * 4 + 4, 4 * 16 + 16
    decoder_blocks = sum(p.numel() for p in mae.decoder.transformer.parameters())
    visible = 12 + 1  # random_masking keeps int(49 * 0.25) patches, plus CLS
    expected = (4 * patch * 49 + (6 * blocks + 12 * 2 * 8 * visible) * visible + 6 * proj_in * visible
                + (6 * decoder_blocks + 12 * 1 * 4 * 50) * 50 + 6 * pred * 49)
    assert mae.flops_per_sample() == expected

"""Faults during training: a non-finite loss stops the run at that step with an error naming it, before any
optimizer step or checkpoint takes the broken weights; a checkpoint is never written from non-finite weights."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from fmlab.resolve import read_checkpoint
from fmlab.tasks.base import TrainingDiverged, nonfinite_tensors
from fmlab.training import build_datamodule, build_task, train
from tests.conftest import TINY_GPT, compose_config, write_corpus


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(root / "corpus", n_docs=30)
    return [*TINY_GPT, f"data.source={corpus}", f"paths.cache_dir={root / 'cache'}", "validate_before_fit=false"]


def test_a_learning_rate_that_diverges_stops_the_run_and_keeps_checkpoints_finite(overrides, tmp_path: Path) -> None:
    cfg = compose_config([*overrides, "task.optimizer.lr=1e12", "callbacks.model_checkpoint.every_n_train_steps=1",
                          "trainer.max_steps=30"], tmp_path)
    with pytest.raises(TrainingDiverged, match=r"train/loss: nan at step \d+.*task\.optimizer\.lr=1e\+12") as err:
        train(cfg)
    step = int(str(err.value).split("at step ")[1].split(":")[0])
    assert 0 < step < 30, "stopped at the step that diverged, not at the end"
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        saved = read_checkpoint(ckpt)
        assert not nonfinite_tensors(saved["state_dict"]), ckpt
        assert saved["global_step"] <= step


def test_no_checkpoint_is_written_from_non_finite_weights(overrides, tmp_path: Path) -> None:
    cfg = compose_config([*overrides, "trainer.max_steps=2"], tmp_path)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    task = build_task(cfg, datamodule)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(task, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    with torch.no_grad():
        task.model.wte.weight[3, 1] = float("inf")
    broken = r"weights: \d tensor\(s\) not finite at step 2 \(e.g. model.wte.weight\)"
    with pytest.raises(TrainingDiverged, match=broken):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists() and (tmp_path / "good.ckpt").is_file()

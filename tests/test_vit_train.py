"""ViT end to end: MAE and supervised pre-training, then fine-tuning and linear probing from their checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmlab.data.image_sources import FASHION_MNIST_DIR, FASHION_MNIST_FILES
from fmlab.resolve import PretrainedError
from fmlab.training import build_datamodule, build_task, run_pretrained, train
from tests.conftest import compose_config
from tests.image_data import TINY_MAE, TINY_VIT, write_image_folder

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("vit") / "images", n_per_class=24)


@pytest.fixture(scope="module")
def mae_run(images: Path, tmp_path_factory) -> Path:
    """A few MAE steps of a tiny ViT with a learned position table, at 28x28."""
    tmp = tmp_path_factory.mktemp("mae")
    cfg = compose_config([
        f"paths.cache_dir={tmp / 'cache'}", "model=vit", "stage=pretrain", "data=image_folder",
        f"data.source={images}", *TINY_VIT, *TINY_MAE, "model.pos_embed=learned", "trainer.max_steps=4",
        "trainer.val_check_interval=4", "validate_before_fit=false",
    ], tmp / "run")
    train(cfg)
    return tmp / "run"


def finetune_config(images: Path, pretrained: Path, tmp: Path, *extra: str):
    return compose_config([
        f"paths.cache_dir={tmp / 'cache'}", "model=vit", "stage=finetune", "data=image_folder",
        f"data.source={images}", f"pretrained={pretrained}", *TINY_VIT, "trainer.max_steps=4",
        "trainer.val_check_interval=4", "validate_before_fit=false", *extra,
    ], tmp / "run")


def pretrained_encoder(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(next((run / "checkpoints").glob("best*.ckpt")), map_location="cpu", weights_only=True)
    assert any(k.startswith("decoder.") for k in ckpt["state_dict"])
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def test_mae_checkpoint_gives_the_encoder_drops_the_decoder(images: Path, mae_run: Path, tmp_path: Path) -> None:
    cfg = finetune_config(images, mae_run, tmp_path, "data.labels_per_class=5")
    pretrained = run_pretrained(cfg)
    datamodule = build_datamodule(cfg, pretrained)
    datamodule.prepare_data()
    task = build_task(cfg, datamodule, pretrained)
    encoder = pretrained_encoder(mae_run)
    own = task.model.state_dict()
    assert set(own) == set(encoder)
    for key, value in encoder.items():
        assert torch.equal(own[key], value), key
    assert not any(k.startswith("decoder.") or "mask_token" in k for k in task.state_dict())
    head = task.head.classifier
    assert head.out_features == 2 and torch.all(head.bias == 0)  # fresh, sized by the data's classes
    assert task.model.config.drop_path == cfg.task.drop_path == 0.1  # the fine-tuning recipe's stochastic depth


def test_linear_probe_leaves_the_encoder_bit_identical(images: Path, mae_run: Path, tmp_path: Path) -> None:
    cfg = finetune_config(images, mae_run, tmp_path, "experiment=vit_linear_probe", "data.labels_per_class=8")
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for key, value in pretrained_encoder(mae_run).items():
        assert torch.equal(ckpt["state_dict"][f"model.{key}"], value), key
    head = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}
    assert "head.norm.running_mean" in head and "head.norm.weight" not in head  # BatchNorm without affine
    assert ckpt["global_step"] == 4
    report = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert {"test/acc", "test/f1"} <= set(report["metrics"]) and len(report["confusion_matrix"]) == 2


def test_finetunes_at_another_resolution(images: Path, mae_run: Path, tmp_path: Path) -> None:
    cfg = finetune_config(images, mae_run, tmp_path, "model.img_size=32", "task.pooling=mean")
    pretrained = run_pretrained(cfg)
    datamodule = build_datamodule(cfg, pretrained)
    datamodule.prepare_data()
    task = build_task(cfg, datamodule, pretrained)
    assert task.model.pos_embed.shape == (1, 1 + 8 * 8, 32)
    assert torch.equal(task.model.pos_embed[:, 0], pretrained_encoder(mae_run)["pos_embed"][:, 0])
    train(cfg)  # and the whole fine-tune runs at 32x32
    assert (tmp_path / "run" / "test_metrics.json").is_file()


def test_channel_mismatch_with_the_checkpoint_names_both(images: Path, mae_run: Path, tmp_path: Path) -> None:
    cfg = finetune_config(images, mae_run, tmp_path, "data.channels=3")
    pretrained = run_pretrained(cfg)
    datamodule = build_datamodule(cfg, pretrained)
    datamodule.prepare_data()
    with pytest.raises(PretrainedError, match=r"model.in_chans=3 but pretrained=.* has in_chans=1.*data.channels=1"):
        build_task(cfg, datamodule, pretrained)


def test_supervised_pretraining_then_finetune(images: Path, tmp_path: Path) -> None:
    cfg = compose_config([
        f"paths.cache_dir={tmp_path / 'cache'}", "model=vit", "stage=supervised", "data=image_folder",
        f"data.source={images}", *TINY_VIT, "trainer.max_steps=4", "trainer.val_check_interval=4",
    ], tmp_path / "sup")
    assert cfg.task._target_ == "fmlab.tasks.classification.ClassificationTask"
    train(cfg)
    assert (tmp_path / "sup" / "test_metrics.json").is_file()
    fine = finetune_config(images, tmp_path / "sup", tmp_path / "ft", "data.labels_per_class=4")
    pretrained = run_pretrained(fine)
    datamodule = build_datamodule(fine, pretrained)
    datamodule.prepare_data()
    task = build_task(fine, datamodule, pretrained)
    ckpt = torch.load(next((tmp_path / "sup" / "checkpoints").glob("best*.ckpt")), weights_only=True)
    assert torch.equal(task.model.patch_embed.proj.weight, ckpt["state_dict"]["model.patch_embed.proj.weight"])


FASHION_FILES = [FASHION_MNIST_DIR / f"{stem}.gz" for pair in FASHION_MNIST_FILES.values() for stem in pair]


@pytest.mark.skipif(
    not all(f.is_file() for f in FASHION_FILES),
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)",
)
def test_train_py_pretrains_on_fashion_mnist(tmp_path: Path) -> None:
    overrides = [
        "model=vit", "stage=pretrain", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", "data.eval_batch_size=64", "logger=csv", "callbacks=none",
        f"paths.log_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done: steps 3" in result.stdout
    (run,) = (tmp_path / "out" / "vit_pretrain").glob("*/*")
    assert sorted(p.name for p in (run / "reconstructions").glob("*.png"))

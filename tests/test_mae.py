"""Masked autoencoding: exact masking, patch round trip, a tiny pre-training run whose loss falls and that draws
its reconstructions."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from fmlab.tasks.mae import MAETask, patchify, random_masking, unpatchify
from fmlab.training import train
from tests.image_data import TINY_MAE, TINY_VIT, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("n", "ratio"), [(49, 0.75), (16, 0.5), (64, 0.9)])
def test_masking_keeps_exactly_the_configured_fraction(n: int, ratio: float) -> None:
    ids_keep, mask, ids_restore = random_masking(6, n, ratio, generator=torch.Generator().manual_seed(0))
    n_keep = int(n * (1 - ratio))
    assert ids_keep.shape == (6, n_keep)
    assert torch.all(mask.sum(dim=1) == n - n_keep)
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)  # what the encoder sees is exactly the unmasked part
    assert len({tuple(row.tolist()) for row in ids_keep.sort(dim=1).values}) > 1  # per-sample masks
    shuffled = torch.arange(n).expand(6, n).gather(1, ids_restore.argsort(dim=1))
    assert torch.equal(shuffled.gather(1, ids_restore), torch.arange(n).expand(6, n))


def test_patchify_round_trip() -> None:
    images = torch.randn(2, 3, 12, 16)
    patches = patchify(images, 4)
    assert patches.shape == (2, 12, 48)
    assert torch.equal(unpatchify(patches, 4, 3, (3, 4)), images)
    assert torch.equal(patches[0, 1].view(4, 4, 3)[..., 0], images[0, 0, :4, 4:8])  # row-major, like the conv


def test_mae_task_shapes_and_norm_pix_loss() -> None:
    model = {"_target_": "fmlab.models.vit.ViTConfig", "img_size": 28, "in_chans": 1, "n_layer": 1, "n_head": 2,
             "n_embd": 32}
    task = MAETask(model, {"_target_": "torch.optim.AdamW", "lr": 1e-3}, {}, decoder={"n_embd": 16, "n_layer": 1})
    loss, pred, mask = task(torch.randn(3, 1, 28, 28))
    assert pred.shape == (3, 49, 16) and mask.shape == (3, 49) and loss.ndim == 0
    assert not any(k.startswith("model.") and "mask_token" in k for k in task.state_dict())  # decoder-side only


def test_pretraining_loss_falls_and_writes_reconstructions(make_config, tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", n_per_class=48)
    cfg = make_config([
        "model=vit", "stage=pretrain", "data=image_folder", f"data.source={images}", *TINY_VIT, *TINY_MAE,
        "trainer.max_steps=100", "trainer.val_check_interval=50", "task.optimizer.lr=3e-3", "data.augment=null",
    ])
    train(cfg)
    run = Path(cfg.paths.output_dir)
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    val = metrics["val/loss"].dropna().tolist()
    assert len(val) == 3 and val[-1] < 0.8 * val[0], val
    pngs = sorted((run / "reconstructions").glob("step*.png"))
    assert [p.name for p in pngs] == ["step000000.png", "step000050.png", "step000100.png"]
    from PIL import Image

    with Image.open(pngs[-1]) as grid:  # 3 rows (original, masked, reconstruction) of 4 images of 28 pixels
        assert grid.size == (4 * 29 + 1, 3 * 29 + 1)


def test_reconstructions_reach_tensorboard_and_wandb(make_config, tmp_path: Path, monkeypatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    images = write_image_folder(tmp_path / "images", n_per_class=16)
    cfg = make_config([
        "model=vit", "stage=pretrain", "data=image_folder", f"data.source={images}", *TINY_VIT, *TINY_MAE,
        "trainer.max_steps=4", "trainer.val_check_interval=4", "data.augment=null", "logger=[tensorboard,wandb]",
    ])
    train(cfg)
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "val/reconstruction" in events.Tags()["images"]
    wandb_images = list((run / "wandb").glob("offline-run-*/files/media/images/val/reconstruction_*.png"))
    assert wandb_images, "the grid is in the offline W&B run"

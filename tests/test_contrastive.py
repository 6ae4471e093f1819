"""SimCLR: NT-Xent on known embeddings, two views per image from the data module, pre-training from train.py with a
falling loss, and fine-tuning from its checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fmlab.data.images import ImageBatches
from fmlab.resolve import load_pretrained, read_checkpoint
from fmlab.tasks.contrastive import nt_xent
from fmlab.training import train
from tests.conftest import compose_config, read_metrics, values
from tests.image_data import TINY_VIT, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nt_xent_matches_the_formula_on_two_images() -> None:
    # Two images, embeddings already unit length: view 1 of image 0 is e0, its twin e0; image 1's views are e1 and
    # (e0 + e1) / sqrt(2).
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mixed = (e0 + e1) / math.sqrt(2)
    z1, z2 = torch.stack([e0, e1]), torch.stack([e0, mixed])
    t = 0.5
    views = [e0, e1, e0, mixed]
    twins = [2, 3, 0, 1]
    expected = 0.0
    for i, twin in enumerate(twins):  # -log softmax of the twin among the other three views
        sims = {j: float(views[i] @ views[j]) / t for j in range(4) if j != i}
        expected += -(sims[twin] - math.log(sum(math.exp(s) for s in sims.values())))
    assert nt_xent(z1, z2, t).item() == pytest.approx(expected / 4, rel=1e-6)


def test_nt_xent_is_low_for_matching_views_and_high_for_swapped_ones() -> None:
    z = torch.eye(8)
    matched, swapped = nt_xent(z, z, 0.1), nt_xent(z, z.roll(1, dims=0), 0.1)
    assert matched < 0.01 and swapped > 5
    assert nt_xent(z, z, 0.1) < nt_xent(z, z, 1.0)  # a lower temperature sharpens the same correct choice
    assert nt_xent(z * 3, z, 0.1).item() == pytest.approx(matched.item(), abs=1e-6)  # cosine: scale-free


def test_two_views_are_augmented_independently_and_validation_views_repeat() -> None:
    from torchvision.transforms import v2

    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8)
    crop = v2.RandomResizedCrop([16, 16], scale=(0.2, 0.5), antialias=True)
    train_views = ImageBatches(images, None, [0.5], [0.25], (16, 16), crop, views=2)
    batch = train_views.__getitems__([0, 1, 2])
    assert batch["views"].shape == (3, 2, 1, 16, 16) and "pixel_values" not in batch
    assert not torch.equal(batch["views"][:, 0], batch["views"][:, 1])
    fixed = ImageBatches(images, None, [0.5], [0.25], (16, 16), crop, views=2, fixed_seed=7)
    torch.testing.assert_close(fixed.__getitems__([3, 4])["views"], fixed.__getitems__([3, 4])["views"])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("simclr") / "images", n_per_class=24)


@pytest.fixture(scope="module")
def simclr_run(images: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("simclr-run")
    cfg = compose_config([
        f"paths.cache_dir={tmp / 'cache'}", "model=vit", "stage=pretrain", "task=simclr", "data=image_folder",
        f"data.source={images}", *TINY_VIT, "trainer.max_steps=16", "trainer.val_check_interval=8",
        "task.projector.hidden=32", "task.projector.dim=16", "task.optimizer.lr=3e-3", "callbacks.knn_probe=null",
    ], tmp / "run")
    train(cfg)
    return tmp / "run"


def test_simclr_pretrains_from_train_py_and_its_loss_falls(simclr_run: Path) -> None:
    rows = read_metrics(simclr_run)
    losses = values(rows, "train/loss")
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    val = values(rows, "val/loss")
    assert len(val) == 3 and val[-1] < val[0]  # before fit, at steps 8 and 16: the same views every time
    assert values(rows, "val/top1")


def test_finetuning_from_simclr_loads_the_backbone_and_drops_the_projector(images: Path, simclr_run: Path,
                                                                        tmp_path: Path) -> None:
    checkpoint = read_checkpoint(next((simclr_run / "checkpoints").glob("best*.ckpt")))
    assert any(k.startswith("projector.") for k in checkpoint["state_dict"])
    source = load_pretrained(str(simclr_run)).state_dict
    assert not any(k.startswith("projector.") for k in source)
    cfg = compose_config([
        f"paths.cache_dir={tmp_path / 'cache'}", "model=vit", "stage=finetune", "data=image_folder",
        f"data.source={images}", f"pretrained={simclr_run}", *TINY_VIT, "trainer.max_steps=2", "trainer.max_epochs=-1",
        "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null", "task.optimizer.lr=1e-12",
        "test_after_fit=false", "task.finetune_mode=linear_probe",
    ], tmp_path / "run")
    train(cfg)
    tuned = read_checkpoint(next((tmp_path / "run" / "checkpoints").glob("*.ckpt")))["state_dict"]
    assert all(torch.equal(tuned["model." + k], v) for k, v in source.items())


def test_simclr_without_two_views_names_the_option() -> None:
    from fmlab.errors import UserError
    from fmlab.tasks.contrastive import ContrastiveTask

    task = ContrastiveTask({"_target_": "fmlab.models.vit.ViTConfig", "size": "mini", "img_size": 8, "patch_size": 4,
                            "in_chans": 1, "n_layer": 1, "n_head": 2, "n_embd": 16},
                           {"_target_": "torch.optim.AdamW", "lr": 1e-3}, {})
    with pytest.raises(UserError, match="data.views=2"):
        task(torch.randn(4, 1, 1, 8, 8))


def test_a_cnn_pretrains_with_simclr_by_default_and_is_probed(images: Path, tmp_path: Path) -> None:
    cfg = compose_config([
        f"paths.cache_dir={tmp_path / 'cache'}", "model=resnet", "stage=pretrain", "data=image_folder",
        f"data.source={images}", *[o for o in TINY_VIT if not o.startswith("model.")], "model.img_size=32",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.knn_probe.max_train=40",
        "callbacks.knn_probe.max_val=20",
    ], tmp_path / "run")
    assert cfg.task._target_ == "fmlab.tasks.contrastive.ContrastiveTask"
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert all(math.isfinite(v) for v in values(rows, "train/loss"))
    assert len(values(rows, "val/knn_acc")) == 2

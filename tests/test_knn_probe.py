"""The online k-NN probe of image pre-training: the classifier on known features, and `val/knn_acc` logged at every
validation of an MAE run (off with callbacks.knn_probe=null)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmlab.callbacks.knn_probe import knn_predict
from fmlab.training import train
from tests.conftest import compose_config, read_metrics, values
from tests.image_data import TINY_MAE, TINY_VIT, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_separates_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    labels = torch.arange(3).repeat_interleave(20)
    train_features = centres[labels] + 0.5 * torch.randn(60, 3, generator=g)
    queries = centres[torch.tensor([2, 0, 1])] + 0.5 * torch.randn(3, 3, generator=g)
    assert knn_predict(train_features, labels, queries, k=5, temperature=0.07, num_classes=3).tolist() == [2, 0, 1]


def test_knn_votes_are_weighted_by_similarity() -> None:
    # One very close neighbour of class 1 outvotes two distant ones of class 0 at a low temperature ...
    train_features = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train_features, labels, query, k=3, temperature=0.05, num_classes=2).item() == 1
    # ... and a plain majority (a high temperature flattens the weights) goes to class 0.
    assert knn_predict(train_features, labels, query, k=3, temperature=100.0, num_classes=2).item() == 0


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("knn") / "images", n_per_class=24)


def mae_config(images: Path, tmp: Path, *extra: str):
    return compose_config([
        f"paths.cache_dir={tmp / 'cache'}", "model=vit", "stage=pretrain", "data=image_folder",
        f"data.source={images}", *TINY_VIT, *TINY_MAE, "trainer.max_steps=4", "trainer.val_check_interval=2",
        *extra,
    ], tmp / "run")


def test_mae_logs_the_probe_at_every_validation(images: Path, tmp_path: Path) -> None:
    train(mae_config(images, tmp_path))
    rows = read_metrics(tmp_path / "run")
    accuracy = values(rows, "val/knn_acc")
    assert len(accuracy) == 3  # before fit, at step 2 and at step 4
    assert all(0 <= a <= 1 for a in accuracy)
    assert len(values(rows, "probe/knn_seconds")) == 3


def test_the_probe_is_in_the_mae_recipe_and_switches_off(images: Path, tmp_path: Path) -> None:
    cfg = compose_config(["model=vit", "stage=pretrain"], tmp_path)
    assert cfg.callbacks.knn_probe._target_ == "fmlab.callbacks.KNNProbe"
    train(mae_config(images, tmp_path, "callbacks.knn_probe=null"))
    assert not values(read_metrics(tmp_path / "run"), "val/knn_acc")

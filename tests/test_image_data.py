"""Image sources and the image data module: IDX files, class folders, HF datasets, splits, errors."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fmlab.data.image_sources import read_idx, read_image_source
from fmlab.data.images import ImageDataModule, pixel_stats
from fmlab.data.sources import DataError
from tests.image_data import pattern_images, write_fashion_like, write_idx, write_image_folder


def datamodule(tmp_path: Path, **kw) -> ImageDataModule:
    dm = ImageDataModule(cache_dir=str(tmp_path / "cache"), batch_size=8, **kw)
    dm.prepare_data()
    dm.setup()
    return dm


def test_idx_reader_round_trip_and_errors(tmp_path: Path) -> None:
    images, _ = pattern_images(5)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", images)), images)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x-idx3-ubyte", images)), images)
    bad = tmp_path / "bad-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x08\x08\x08\x03nonsense"))
    with pytest.raises(DataError, match="bad-idx3-ubyte.gz: not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx3-ubyte.gz"
    short.write_bytes(gzip.compress((tmp_path / "x-idx3-ubyte").read_bytes()[:-10]))
    with pytest.raises(DataError, match="short-idx3-ubyte.gz: IDX header says shape"):
        read_idx(short)


def test_fashion_mnist_preset_splits_labels_and_normalisation(tmp_path: Path) -> None:
    root = write_fashion_like(tmp_path / "fm", n_train=200, n_test=60)
    dm = datamodule(tmp_path, root=str(root), val_fraction=0.1)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (180, 20, 60)
    assert dm.label_names[0] == "T-shirt/top" and len(dm.label_names) == 10
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"pixel_values"}  # pre-training ignores the labels
    assert batch["pixel_values"].shape == (8, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    assert dm.describe().model == {"in_chans": 1, "img_size": 28}
    # Statistics come from the training split, so the normalised training images have mean 0 and std 1.
    x = (dm.train_set.images.float() / 255 - dm.mean[0]) / dm.std[0]
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    assert dm.describe().state["normalization"] == {"mean": dm.mean, "std": dm.std}


def test_few_labels_are_stratified_and_seeded(tmp_path: Path) -> None:
    root = write_fashion_like(tmp_path / "fm", n_train=400, n_test=20)
    dm = datamodule(tmp_path, root=str(root), labeled=True, labels_per_class=3, val_fraction=0.25)
    assert torch.bincount(dm.train_set.labels, minlength=10).tolist() == [3] * 10
    assert len(dm.val_set) == 30 and len(dm.test_set) == 20  # validation drawn as few, test whole
    assert torch.bincount(dm.val_set.labels, minlength=10).tolist() == [3] * 10
    everything = datamodule(tmp_path, root=str(root), labeled=True, labels_per_class=3, val_fraction=0.25,
                            val_labels="all")
    assert len(everything.val_set) == 100
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"pixel_values", "labels"}
    assert dm.describe().task == {"num_labels": 10}
    again = datamodule(tmp_path, root=str(root), labeled=True, labels_per_class=3, val_fraction=0.25)
    assert torch.equal(dm.train_set.images, again.train_set.images)


def test_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root=.*nowhere.*dataset-fashion-mnist"):
        datamodule(tmp_path, root=str(tmp_path / "nowhere"))


def test_channels_convert_or_mismatch_names_both(tmp_path: Path) -> None:
    root = str(write_fashion_like(tmp_path / "fm", n_train=40, n_test=10))
    with pytest.raises(DataError, match=r"1 channel\(s\) but model.in_chans=3"):
        datamodule(tmp_path, root=root, in_chans=3, val_fraction=0.25)
    dm = datamodule(tmp_path, root=root, in_chans=3, channels=3, val_fraction=0.25)
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (8, 3, 28, 28)
    assert len(dm.mean) == 3


def test_batches_come_out_at_the_model_size_with_augmentation(tmp_path: Path) -> None:
    root = str(write_fashion_like(tmp_path / "fm", n_train=40, n_test=10))
    augment = {
        "crop": {"_target_": "torchvision.transforms.v2.RandomResizedCrop", "scale": [0.5, 1.0]},
        "flip": {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"},
        "off": None,
    }
    dm = datamodule(tmp_path, root=root, img_size=32, augment=augment, val_fraction=0.25)
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (8, 1, 32, 32)
    assert next(iter(dm.test_dataloader()))["pixel_values"].shape == (8, 1, 32, 32)
    assert dm.describe().model["img_size"] == 32


def test_image_folder_with_a_corrupt_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_image_folder(tmp_path / "imgs", n_per_class=5)
    (root / "class1" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        read_image_source(str(root), None, None)
    with caplog.at_level(logging.WARNING):
        splits = read_image_source(str(root), None, None, skip_bad_files=True)
    assert "Skipped 1 unreadable image file(s)" in caplog.text
    images, labels = splits.splits["train"]
    assert images.shape == (10, 1, 28, 28) and images.dtype == torch.uint8
    assert splits.label_names == ["class0", "class1"] and labels.tolist().count(1) == 5


def test_image_folder_rgb_sizes_and_module(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", n_per_class=10, rgb=True)
    write_image_folder(tmp_path / "odd", n_per_class=1, size=20)
    (root / "class0" / "odd.png").write_bytes((tmp_path / "odd" / "class0" / "000.png").read_bytes())
    with pytest.raises(DataError, match=r"odd\.png is 20x20.*model.img_size"):
        read_image_source(str(root), None, None)
    dm = datamodule(tmp_path, source=str(root), img_size=28, val_fraction=0.2, labeled=True)
    assert dm.describe().model == {"in_chans": 3, "img_size": 28}
    assert len(dm.train_set) + len(dm.val_set) == 21 and dm.test_set is dm.val_set


def test_a_folder_without_classes_is_unlabeled_pretraining_data(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "imgs", n_per_class=6)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, png in enumerate(sorted(root.rglob("*.png"))):
        png.rename(flat / f"{i}.png")
    dm = datamodule(tmp_path, source=str(flat), val_fraction=0.25)
    assert (len(dm.train_set), len(dm.val_set)) == (9, 3) and dm.label_names == []
    assert set(next(iter(dm.train_dataloader()))) == {"pixel_values"}
    with pytest.raises(DataError, match="unlabeled images; fine-tuning needs a class folder"):
        datamodule(tmp_path, source=str(flat), val_fraction=0.25, labeled=True)


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    images, labels = pattern_images(12)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["h", "v"])})
    rows = {"image": [Image.fromarray(i) for i in images], "label": labels.tolist()}
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(rows, features=features),
        "test": datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()}, features=features),
    })
    ds.save_to_disk(str(tmp_path / "hf"))
    splits = read_image_source(str(tmp_path / "hf"), None, None)
    assert splits.label_names == ["h", "v"]
    assert splits.splits["train"][0].shape == (12, 1, 28, 28)
    assert torch.equal(splits.splits["test"][1], torch.as_tensor(labels[:4], dtype=torch.int64))
    assert np.array_equal(splits.splits["train"][0][:, 0].numpy(), images)


def test_pixel_stats_are_exact() -> None:
    images = torch.randint(0, 256, (50, 2, 8, 8), dtype=torch.uint8)
    mean, std = pixel_stats(images)
    x = images.double() / 255
    assert mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-5)

"""Reading labeled images into uint8 tensors: image presets by name (Fashion-MNIST, IDX files), else a
class-per-folder tree or a saved HF dataset.

Every reader returns `ImageSplits`: per split, images (N, C, H, W) uint8 and labels (N,) int64, plus the class
names. Errors are `DataError`s that name the file or option at fault.
"""

from __future__ import annotations

import gzip
import io
import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fmlab.data.sources import SPLIT_NAMES, DataError, Preset, is_hf_dataset, load_hf_dataset, register_preset

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageSplits:
    """Decoded splits: name -> (images (N, C, H, W) uint8, labels (N,) int64; -1 where unlabeled); for
    segmentation also name -> masks (N, H, W) uint8 of class ids (fmlab/data/image_masks.py) and their names."""

    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]
    label_names: list[str] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_names: list[str] = field(default_factory=list)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not -> an array of its shape and type."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read IDX file ({type(err).__name__}: {err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_folder(root: str | None, download_dir: Path) -> Path:
    """The folder that holds the four Fashion-MNIST IDX files: `root`, the Debian package, or a download."""
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    candidates = [Path(root).expanduser()] if root else [FASHION_MNIST_DIR, download_dir / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all(_find_idx(folder, s) for s in stems):
            return folder
    how = (
        "Install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist, files land in "
        f"{FASHION_MNIST_DIR}), or download {', '.join(s + '.gz' for s in stems)} from "
        "https://github.com/zalandoresearch/fashion-mnist and set data.root=<that folder>"
    )
    if root:
        missing = [s for s in stems if not _find_idx(Path(root).expanduser(), s)]
        raise DataError(f"data.root={root}: no Fashion-MNIST file {missing[0]}(.gz) there. {how}")
    try:
        from torchvision.datasets import FashionMNIST

        log.info("Fashion-MNIST not found locally; downloading into %s", download_dir)
        FashionMNIST(str(download_dir), train=True, download=True)
        FashionMNIST(str(download_dir), train=False, download=True)
    except Exception as err:  # no network, a proxy, a mirror down: all end in the same advice
        raise DataError(
            f"Fashion-MNIST files not found in {FASHION_MNIST_DIR} and the download failed "
            f"({type(err).__name__}: {err}). {how}"
        ) from err
    return candidates[-1]


def read_fashion_mnist(root: str | None, download_dir: Path) -> ImageSplits:
    """The official 60,000 train / 10,000 test split, as (N, 1, 28, 28) uint8 images."""
    folder = fashion_mnist_folder(root, download_dir)
    splits = {}
    for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
        images_path, labels_path = _find_idx(folder, images_stem), _find_idx(folder, labels_stem)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{images_path}: expected (N, H, W) uint8 images, got {images.shape} {images.dtype}")
        if labels.shape != images.shape[:1]:
            raise DataError(f"{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images in {images_path}")
        splits[split] = (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))
    return ImageSplits(splits, list(FASHION_MNIST_CLASSES))


def fashion_mnist_files(root: str | None, download_dir: Path) -> list[Path]:
    """The four IDX files the preset reads (found, or downloaded, as `read_fashion_mnist` finds them)."""
    folder = fashion_mnist_folder(root, download_dir)
    return [_find_idx(folder, s) for pair in FASHION_MNIST_FILES.values() for s in pair]


register_preset(Preset("fashion_mnist", "images", read=read_fashion_mnist, files=fashion_mnist_files))


# ---- class-per-folder trees and HF datasets saved to disk ---------------------------------------------------


def folder_splits(root: Path) -> dict[str, Path]:
    """`root/{train,val,test}/<class>/*.png` or `root/<class>/*.png` (then everything is train)."""
    named = {s: root / d for s, d in (("train", "train"), ("val", "val"), ("val", "validation"), ("test", "test"))
             if (root / d).is_dir()}
    return named if "train" in named else {"train": root}


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def image_files(folder: Path) -> list[tuple[Path, str | None]]:
    """(file, class name) pairs of a class-per-subfolder tree, sorted; a folder of images without class
    subfolders gives unlabeled images (class None), for pre-training."""
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    if classes:
        files = [(p, cls.name) for cls in classes for p in sorted(cls.rglob("*")) if _is_image(p)]
    else:
        files = [(p, None) for p in sorted(folder.iterdir()) if _is_image(p)]
    if not files:
        raise DataError(f"data.source={folder}: no images ({'/'.join(IMAGE_SUFFIXES)}) in it or its class folders")
    return files


def to_uint8(image, mode: str, size: tuple[int, int] | None, name: str) -> np.ndarray:
    """A PIL image -> (C, H, W) uint8 in `mode` ("L" or "RGB"), resized to `size` (H, W) when given."""
    from PIL import Image

    image = image.convert(mode)
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_images(
    items, mode: str | None, size: tuple[int, int] | None, skip_bad_files: bool, where: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """(name, opener, label) items -> stacked (N, C, H, W) uint8 and labels; skipped count.

    The first image fixes the mode (grey "L" or "RGB") and, without `size`, the size every image must have.
    """
    from PIL import UnidentifiedImageError

    arrays, labels, skipped, seen = [], [], 0, size
    for name, open_image, label in items:
        try:
            with open_image() as image:
                image.load()
                if mode is None:
                    mode = "L" if image.mode in ("1", "L", "I;16", "I", "F") else "RGB"
                array = to_uint8(image, mode, size, name)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
            if not skip_bad_files:
                raise DataError(
                    f"{name}: not a readable image ({type(err).__name__}: {err}); remove it or set "
                    "data.skip_bad_files=true"
                ) from err
            skipped += 1
            continue
        if seen is None:
            seen = array.shape[1:]
        elif array.shape[1:] != tuple(seen):
            raise DataError(
                f"{name} is {array.shape[2]}x{array.shape[1]} but earlier images in {where} are {seen[1]}x{seen[0]}; "
                "set model.img_size to resize them all"
            )
        arrays.append(array)
        labels.append(label)
    if not arrays:
        raise DataError(f"{where}: no readable images")
    return np.stack(arrays), np.asarray(labels, dtype=np.int64), skipped


def read_image_source(
    source: str, channels: int | None, size: tuple[int, int] | None, skip_bad_files: bool = False
) -> ImageSplits:
    """A class-per-subfolder tree or an HF `datasets` dataset saved with save_to_disk -> decoded splits."""
    from PIL import Image

    root = Path(source).expanduser()
    if not root.is_dir():
        raise DataError(f"data.source: no such folder: {source}")
    mode = {None: None, 1: "L", 3: "RGB"}.get(channels)
    if channels not in (None, 1, 3):
        raise DataError(f"data.channels={channels}; choose 1 (grey), 3 (RGB) or null (as stored)")
    splits, names, total_skipped = {}, [], 0
    if is_hf_dataset(root):
        parts, names = hf_items(root)
    else:
        parts = {}
        trees = folder_splits(root)
        names = sorted({cls for folder in trees.values() for _, cls in image_files(folder) if cls is not None})
        index = {n: i for i, n in enumerate(names)} | {None: -1}
        for split, folder in trees.items():
            parts[split] = [(str(p), partial(Image.open, p), index[cls]) for p, cls in image_files(folder)]
    for split, items in parts.items():
        images, labels, skipped = decode_images(items, mode, size, skip_bad_files, f"{source} ({split})")
        if mode is None:  # later splits follow the first split's mode and size
            mode = "L" if images.shape[1] == 1 else "RGB"
        size = tuple(images.shape[2:])
        total_skipped += skipped
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    if total_skipped:
        log.warning("Skipped %d unreadable image file(s) in %s (data.skip_bad_files=true)", total_skipped, source)
    return ImageSplits(splits, names)


def _open_stored(data: bytes | None, path: str | None):
    from PIL import Image

    return Image.open(io.BytesIO(data)) if data is not None else Image.open(path)


def hf_items(root: Path, image_column: str = "image", label_column: str = "label"):
    """Items of a `datasets` Dataset/DatasetDict saved to disk; split names train / validation(val) / test."""
    parts_in = load_hf_dataset(root)
    renamed = {**SPLIT_NAMES, "all": "train"}  # a lone Dataset is all training images
    parts, names = {}, []
    for split, ds in parts_in.items():
        for column in (image_column, label_column):
            if column not in ds.column_names:
                raise DataError(f"{root} ({split}): no column {column!r}; columns present: {ds.column_names}")
        feature = ds.features[label_column]
        names = list(getattr(feature, "names", None) or names)
        rows = ds.cast_column(image_column, ds.features[image_column].__class__(decode=False))
        items = []
        for i, row in enumerate(rows):
            data = row[image_column]
            name = f"{root} ({split} row {i}{', ' + data['path'] if data.get('path') else ''})"
            items.append((name, partial(_open_stored, data.get("bytes"), data.get("path")), int(row[label_column])))
        parts[renamed.get(split, split)] = items
    if "train" not in parts:
        raise DataError(f"{root}: no 'train' split; splits present: {sorted(parts_in)}")
    if not names:
        names = [str(i) for i in range(int(max(int(r[2]) for r in parts["train"])) + 1)]
    return parts, names

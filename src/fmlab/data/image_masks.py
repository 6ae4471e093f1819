"""Images with per-pixel class masks (semantic segmentation): the easy-VQA preset, whose masks are derived exactly
from its flat-colour shapes, and image / mask folder pairs.

Masks are (N, H, W) uint8 class ids, `IGNORE_MASK` (255) where a pixel has no class. Both readers return
`ImageSplits` with `masks` and `mask_names` set; the image-level `labels` are the image's main class (easy-VQA: its
shape), so few-mask draws stay stratified.
"""

from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fmlab.data.image_sources import IMAGE_SUFFIXES, ImageSplits, decode_images, folder_splits
from fmlab.data.sources import SPLIT_NAMES, DataError, Preset, load_hf_dataset, register_preset
from fmlab.models.dense import IGNORE_MASK

EASY_VQA_SHAPES = ["circle", "rectangle", "triangle"]
# A shape fills this share of its bounding box: a rectangle all of it, a disc pi/4, a triangle half. Used only
# for the images whose questions leave the shape open (4 % of them).
FILL_RECTANGLE, FILL_CIRCLE = 0.95, 0.69


# ---- easy-VQA (PyPI easy-vqa==1.0, MIT): 4,000 train / 1,000 test 64x64 images of one shape each ---------------


def easy_vqa_root() -> Path:
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or spec.origin is None:
        raise DataError("data.source=easy_vqa needs the PyPI package easy-vqa==1.0 (pip install easy-vqa==1.0; "
                        "make setup installs it)")
    return Path(spec.origin).parent / "data"


def shape_from_questions(questions: list[list]) -> dict[int, str]:
    """Image id -> its shape, where the questions about it decide it: an answer that is a shape, a colour asked
    of a named shape ("what color is the triangle?"), or yes / no to one (negations read as such)."""
    present: dict[int, set[str]] = {}
    absent: dict[int, set[str]] = {}
    for question, answer, image in questions:
        if answer in EASY_VQA_SHAPES:
            present.setdefault(image, set()).add(answer)
            continue
        named = [s for s in EASY_VQA_SHAPES if s in question]
        if not named:
            continue
        if answer not in ("yes", "no"):
            present.setdefault(image, set()).add(named[0])
            continue
        words = f" {question.rstrip('?')} "
        negated = " not " in words or " no " in words
        (present if (answer == "yes") != negated else absent).setdefault(image, set()).add(named[0])
    shapes = {}
    for image in set(present) | set(absent):
        candidates = present.get(image) or set(EASY_VQA_SHAPES) - absent.get(image, set())
        if len(candidates) == 1:
            shapes[image] = next(iter(candidates))
    return shapes


def shape_mask(image: np.ndarray) -> np.ndarray:
    """(3, H, W) uint8 of one flat-colour shape on a flat background -> its (H, W) boolean mask: the background
    colour is the border's median, the shape's the median of the pixels farthest from it, and every pixel goes to
    the nearer of the two (anti-aliased edge pixels included)."""
    pixels = image.reshape(3, -1).T.astype(np.float32)
    h, w = image.shape[1:]
    border = np.concatenate([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], axis=1).T
    background = np.median(border, axis=0)
    distance = np.abs(pixels - background).sum(axis=1)
    shape = np.median(pixels[distance > distance.max() / 2], axis=0)
    nearer_shape = ((pixels - background) ** 2).sum(1) > ((pixels - shape) ** 2).sum(1)
    return nearer_shape.reshape(h, w)


def shape_from_mask(mask: np.ndarray) -> str:
    """The shape whose typical fill of its bounding box is nearest the mask's."""
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "rectangle" if fill >= FILL_RECTANGLE else "circle" if fill >= FILL_CIRCLE else "triangle"


def read_easy_vqa(root: str | None = None, **_: object) -> ImageSplits:
    """Images (N, 3, 64, 64), labels = the shape, masks = 0 background / 1 + shape index on the shape's pixels."""
    base = Path(root).expanduser() if root else easy_vqa_root()
    splits, masks = {}, {}
    for split in ("train", "test"):
        folder = base / split / "images"
        questions_file = base / split / "questions.json"
        try:
            questions = json.loads(questions_file.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{questions_file}: cannot read easy-VQA questions ({err})") from err
        shapes = shape_from_questions(questions)
        files = sorted((p for p in folder.glob("*.png")), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)
        if not files:
            raise DataError(f"{folder}: no easy-VQA images")
        items = [(str(p), partial(_open, p), -1) for p in files]
        images, _, _ = decode_images(items, "RGB", None, False, str(folder))
        split_masks = np.zeros((len(images), *images.shape[2:]), dtype=np.uint8)
        labels = np.zeros(len(images), dtype=np.int64)
        for i, (path, image) in enumerate(zip(files, images, strict=True)):
            mask = shape_mask(image)
            shape = shapes.get(int(path.stem)) if path.stem.isdigit() else None
            labels[i] = EASY_VQA_SHAPES.index(shape or shape_from_mask(mask))
            split_masks[i][mask] = labels[i] + 1
        splits[split] = (torch.from_numpy(images), torch.from_numpy(labels))
        masks[split] = torch.from_numpy(split_masks)
    return ImageSplits(splits, list(EASY_VQA_SHAPES), masks, ["background", *EASY_VQA_SHAPES])


def easy_vqa_files(root: str | None = None, **_: object) -> list[Path]:
    base = Path(root).expanduser() if root else easy_vqa_root()
    return [base / split / "questions.json" for split in ("train", "test")]


def _open(path: Path):
    from PIL import Image

    return Image.open(path)


register_preset(Preset("easy_vqa", "images", read=read_easy_vqa, files=easy_vqa_files))


# ---- image / mask folder pairs ---------------------------------------------------------------------------------


def is_mask_folder(root: Path) -> bool:
    """`root/images` beside `root/masks`, or `root/train/images` beside `root/train/masks`."""
    return any((d / "images").is_dir() and (d / "masks").is_dir() for d in (root, root / "train"))


def mask_class_names(root: Path, masks: list[np.ndarray]) -> list[str]:
    """`root/classes.txt` (one name per line, in id order), else `class_<id>` up to the largest id in the masks."""
    listing = root / "classes.txt"
    top = max((int(m[m != IGNORE_MASK].max(initial=0)) for m in masks), default=0)
    if not listing.is_file():
        return [f"class_{i}" for i in range(max(top + 1, 2))]
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if top >= len(names):
        raise DataError(f"{listing}: {len(names)} class names, but a mask holds class id {top}; list one name "
                        f"per class id, or mark unlabeled pixels {IGNORE_MASK}")
    return names


def read_mask(open_mask, name: str, image_size: tuple[int, int], size: tuple[int, int] | None) -> np.ndarray:
    """A single-channel PNG of class ids (grey or palette indices; `open_mask()` opens it, `name` names it in
    errors) of an image of `image_size` (H, W) -> (H, W) uint8, resized to `size` by nearest neighbour."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open_mask() as mask:
            if mask.mode not in ("L", "P", "1", "I", "I;16"):
                raise DataError(f"{name}: a mask holds one class id per pixel (a grey or palette PNG), not "
                                f"{mask.mode} colours")
            if (mask.height, mask.width) != tuple(image_size):
                raise DataError(f"{name}: the mask is {mask.width}x{mask.height} but its image is "
                                f"{image_size[1]}x{image_size[0]}; a mask must have its image's size")
            if size is not None and (mask.height, mask.width) != tuple(size):
                mask = mask.resize((size[1], size[0]), Image.Resampling.NEAREST)
            array = np.asarray(mask, dtype=np.int64)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"{name}: not a readable mask ({type(err).__name__}: {err})") from err
    if array.min() < 0 or array.max() > IGNORE_MASK:
        raise DataError(f"{name}: class ids must be 0-{IGNORE_MASK - 1} ({IGNORE_MASK}: no class)")
    return array.astype(np.uint8)


def image_size_of(open_image) -> tuple[int, int]:
    with open_image() as image:
        return image.height, image.width


def read_mask_folder(root: Path, channels: int | None, size: tuple[int, int] | None) -> ImageSplits:
    """`root/[split/]images/<name>.<ext>` with `root/[split/]masks/<name>.png` -> decoded splits with masks.

    Every image needs its mask, of its size (an error names the file otherwise); with `size` (model.img_size)
    images are resized bicubic and masks nearest-neighbour, else every image must have the first one's size.
    """
    from PIL import Image

    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    trees = folder_splits(root) if not (root / "images").is_dir() else {"train": root}
    splits, masks = {}, {}
    for split, folder in trees.items():
        if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
            raise DataError(f"{folder}: a segmentation split needs images/ and masks/ folders")
        files = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{folder / 'images'}: no images ({'/'.join(IMAGE_SUFFIXES)})")
        items = [(str(p), partial(Image.open, p), -1) for p in files]
        images, _, _ = decode_images(items, mode, size, skip_bad_files=False, where=f"{folder / 'images'}")
        mode = mode or ("L" if images.shape[1] == 1 else "RGB")
        split_masks = []
        for path in files:
            mask_file = folder / "masks" / f"{path.stem}.png"
            if not mask_file.is_file():
                raise DataError(f"{path}: no mask {mask_file}; every image needs masks/<its name>.png")
            split_masks.append(read_mask(partial(Image.open, mask_file), str(mask_file),
                                         image_size_of(partial(Image.open, path)), tuple(images.shape[2:])))
        splits[split] = (torch.from_numpy(images), torch.from_numpy(main_class(split_masks)))
        masks[split] = torch.from_numpy(np.stack(split_masks))
    names = mask_class_names(root, [m for split in masks.values() for m in split.numpy()])
    return ImageSplits(splits, names, masks, names)


def read_hf_masks(root: Path, channels: int | None, size: tuple[int, int] | None,
                  image_column: str = "image", mask_column: str = "annotation") -> ImageSplits:
    """A `datasets` folder saved with save_to_disk whose rows hold an image and its mask image (the layout of
    the Hub's scene_parse_150 / ADE20K: `image`, `annotation`) -> decoded splits with masks; class names from
    `classes.txt` beside it, else `class_<id>`."""
    from fmlab.data.image_sources import _open_stored

    mode = {None: None, 1: "L", 3: "RGB"}[channels]
    splits, masks = {}, {}
    for split, ds in load_hf_dataset(root).items():
        for column in (image_column, mask_column):
            if column not in ds.column_names:
                raise DataError(f"{root} ({split}): no column {column!r}; a segmentation dataset has "
                                f"{image_column!r} and {mask_column!r}; columns present: {ds.column_names}")
        rows = ds.cast_column(image_column, ds.features[image_column].__class__(decode=False))
        rows = rows.cast_column(mask_column, ds.features[mask_column].__class__(decode=False))
        opened = [(f"{root} ({split} row {i})", partial(_open_stored, row[image_column].get("bytes"),
                                                         row[image_column].get("path")),
                   partial(_open_stored, row[mask_column].get("bytes"), row[mask_column].get("path")))
                  for i, row in enumerate(rows)]
        images, _, _ = decode_images([(n, o, -1) for n, o, _ in opened], mode, size, False, f"{root} ({split})")
        mode = mode or ("L" if images.shape[1] == 1 else "RGB")
        split_masks = [read_mask(m, f"{n}, column {mask_column}", image_size_of(o), tuple(images.shape[2:]))
                       for n, o, m in opened]
        name = SPLIT_NAMES.get(split, "train" if split == "all" else split)
        splits[name] = (torch.from_numpy(images), torch.from_numpy(main_class(split_masks)))
        masks[name] = torch.from_numpy(np.stack(split_masks))
    if "train" not in splits:
        raise DataError(f"{root}: no 'train' split; splits present: {sorted(splits)}")
    names = mask_class_names(root, [m for split in masks.values() for m in split.numpy()])
    return ImageSplits(splits, names, masks, names)


def main_class(masks: list[np.ndarray]) -> np.ndarray:
    """Each mask's most frequent class other than 0 (the background by convention), else 0: what few-mask draws
    stratify on."""
    labels = []
    for mask in masks:
        counts = np.bincount(mask[mask != IGNORE_MASK].ravel(), minlength=2)
        labels.append(int(counts[1:].argmax() + 1) if counts[1:].any() else 0)
    return np.asarray(labels, dtype=np.int64)

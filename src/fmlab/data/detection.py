"""Images with object boxes (detection): Pascal VOC XML and COCO JSON readers, the deepforest tree-crown preset
(real airborne images, tiled), easy-VQA's shapes as boxes, box-aware augmentation, batches of ragged targets.

Boxes are (N, 4) float `xyxy` pixels; labels are 1..K (0 is the detector's background), `class_names[k - 1]`
names class k. Every reader checks each box against its image and names the file and object at fault.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.images import pixel_stats
from fmlab.data.sampling import stratified_split
from fmlab.data.sources import DataError, fingerprint

log = logging.getLogger(__name__)
DEEPFOREST_TILE = 400  # the package's two small images are 400x400; the two large ones are tiled to match
DEEPFOREST_SPLITS = {  # train on two Yellowstone crops (tiled), validate and test on images of two other sites
    "train": ("2019_YELL_2_528000_4978000_image_crop2.xml", "2019_YELL_2_541000_4977000_image_crop.xml"),
    "val": ("SOAP_061.xml",),
    "test": ("OSBS_029.xml",),
}
MIN_KEPT_AREA = 0.5  # a box cut by a tile edge stays when this share of it is inside the tile


@dataclass
class Annotated:
    """One image and its objects: (C, H, W) uint8, boxes (N, 4) float32 xyxy, class names per box."""

    image: torch.Tensor
    boxes: torch.Tensor
    names: list[str]
    where: str


def check_boxes(boxes: np.ndarray, width: int, height: int, where: str) -> None:
    """Every box inside its image and of positive size, else a DataError naming `where` and the object."""
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise DataError(f"{where}: object {i} has box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) outside its "
                            f"{width}x{height} image or of no size; fix or remove it")


def load_rgb(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy())
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from err


def read_voc(xml_path: Path, image_dir: Path | None = None) -> Annotated:
    """A Pascal VOC annotation file and the image its `<filename>` names (beside it, or in `image_dir`)."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as err:
        raise DataError(f"{xml_path}: not a readable VOC XML file ({err})") from err
    filename = root.findtext("filename")
    if not filename:
        raise DataError(f"{xml_path}: no <filename>: VOC annotations name their image")
    image = load_rgb((image_dir or xml_path.parent) / filename)
    boxes, names = [], []
    for i, obj in enumerate(root.iter("object")):
        box = obj.find("bndbox")
        try:
            boxes.append([float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")])
        except (AttributeError, TypeError, ValueError) as err:
            raise DataError(f"{xml_path}: object {i} has no complete <bndbox> (xmin, ymin, xmax, ymax)") from err
        names.append((obj.findtext("name") or "").strip())
    array = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    check_boxes(array, image.shape[2], image.shape[1], str(xml_path))
    return Annotated(image, torch.from_numpy(array), names, str(xml_path))


def read_coco(json_path: Path, image_dir: Path | None = None) -> list[Annotated]:
    """A COCO detection JSON (`images`, `annotations` with `bbox` = x, y, width, height, `categories`)."""
    try:
        coco = json.loads(json_path.read_text())
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        images = {im["id"]: im for im in coco["images"]}
        annotations = coco["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{json_path}: not a COCO detection file ({type(err).__name__}: {err})") from err
    per_image: dict[int, list[dict]] = {i: [] for i in images}
    for a in annotations:
        if a.get("image_id") not in per_image or a.get("category_id") not in categories:
            raise DataError(f"{json_path}: annotation {a.get('id')} names an unknown image or category")
        per_image[a["image_id"]].append(a)
    out = []
    for image_id, info in images.items():
        image = load_rgb((image_dir or json_path.parent) / info["file_name"])
        x = np.asarray([a["bbox"] for a in per_image[image_id]], dtype=np.float32).reshape(-1, 4)
        boxes = np.concatenate([x[:, :2], x[:, :2] + x[:, 2:]], axis=1)
        where = f"{json_path} (image {info['file_name']})"
        check_boxes(boxes, image.shape[2], image.shape[1], where)
        out.append(Annotated(image, torch.from_numpy(boxes), [categories[a["category_id"]] for a in
                                                               per_image[image_id]], where))
    return out


def tile(item: Annotated, size: int) -> list[Annotated]:
    """Square tiles of `size` covering the image (the last row and column flush with its edges), each with the
    boxes that keep at least MIN_KEPT_AREA of their area inside it, clipped to it."""
    _, h, w = item.image.shape
    if h <= size and w <= size:
        return [item]
    tiles = []
    area = (item.boxes[:, 2] - item.boxes[:, 0]) * (item.boxes[:, 3] - item.boxes[:, 1])
    for y in tile_starts(h, size):
        for x in tile_starts(w, size):
            clipped = item.boxes - torch.tensor([x, y, x, y], dtype=torch.float32)
            clipped = clipped.clamp(min=0).minimum(torch.tensor([size, size, size, size], dtype=torch.float32))
            inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = inside >= MIN_KEPT_AREA * area
            tiles.append(Annotated(item.image[:, y:y + size, x:x + size].contiguous(), clipped[keep],
                                   [n for n, k in zip(item.names, keep.tolist(), strict=True) if k],
                                   f"{item.where} (tile x={x}, y={y})"))
    return tiles


def tile_starts(length: int, size: int) -> list[int]:
    """Offsets of tiles of `size` along `length`: every `size` pixels, the last one flush with the end."""
    last = max(length - size, 0)
    return sorted({*range(0, last, size), last})


def package_data(name: str) -> Path:
    """The `data/` folder of an installed package, found without importing it (deepforest's imports are heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.source={name} needs the PyPI package {name} (pip install --no-deps deepforest==2.1.0; "
                        "make setup installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_deepforest(root: str | None = None) -> dict[str, list[Annotated]]:
    """deepforest 2.1.0's tree crowns (every class read as `tree`): the two large images tiled for training."""
    folder = Path(root).expanduser() if root else package_data("deepforest")
    splits = {}
    for split, files in DEEPFOREST_SPLITS.items():
        items = []
        for name in files:
            item = read_voc(folder / name)
            item.names = ["tree"] * len(item.names)
            items += tile(item, DEEPFOREST_TILE)
        splits[split] = items
    return splits


def read_easy_vqa_boxes(root: str | None = None) -> dict[str, list[Annotated]]:
    """easy-VQA's shapes as one box each (the bounding box of the derived mask), class = the shape."""
    from fmlab.data.image_masks import EASY_VQA_SHAPES, read_easy_vqa

    decoded = read_easy_vqa(root)
    splits = {}
    for split, (images, labels) in decoded.splits.items():
        items = []
        for i, (image, label, mask) in enumerate(zip(images, labels, decoded.masks[split], strict=True)):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            items.append(Annotated(image, box, [EASY_VQA_SHAPES[int(label)]], f"easy_vqa {split} {i}"))
        splits[split] = items
    return splits


def not_a_detection_source(source: str) -> DataError:
    return DataError(f"data.source={source}: not a preset (deepforest, easy_vqa), a COCO .json file or a folder of "
                     "VOC .xml files")


def read_detection_source(source: str, root: str | None) -> dict[str, list[Annotated]]:
    """A preset (`deepforest`, `easy_vqa`), a COCO JSON file, or a folder of VOC XML files (with `train/`,
    `val/`, `test/` subfolders, or all training)."""
    if source == "deepforest":
        return read_deepforest(root)
    if source == "easy_vqa":
        return read_easy_vqa_boxes(root)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".json":
        return {"train": read_coco(path)}
    if not path.is_dir():
        raise not_a_detection_source(source)
    named = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    folders = named if "train" in named else {"train": path}
    splits = {}
    for split, folder in folders.items():
        files = sorted(folder.glob("*.xml"))
        jsons = sorted(folder.glob("*.json"))
        if not files and not jsons:
            raise DataError(f"{folder}: no VOC .xml or COCO .json annotation files")
        splits[split] = [read_voc(f) for f in files] + [i for f in jsons for i in read_coco(f)]
    return splits


class BoxBatches(Dataset):
    """Whole batches of same-size images with their targets: `pixel_values` (B, C, H, W) normalised, `boxes` and
    `labels` lists (one tensor per image); the augmentation moves each image's boxes with it (torchvision v2's
    `BoundingBoxes`) and drops boxes it pushes out (`SanitizeBoundingBoxes`)."""

    def __init__(self, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                 mean: list[float], std: list[float], transform: v2.Transform | None = None) -> None:
        self.images, self.boxes, self.labels, self.transform = images, boxes, labels, transform
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict:
        images, boxes, labels = [], [], []
        for i in indices:
            image, box, label = self.images[i], self.boxes[i], self.labels[i]
            if self.transform is not None:
                size = tuple(image.shape[1:])
                target = {"boxes": tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=size), "labels": label}
                image, target = self.transform(tv_tensors.Image(image), target)
                box, label = target["boxes"].as_subclass(torch.Tensor), target["labels"]
            images.append(image.as_subclass(torch.Tensor))
            boxes.append(box.float())
            labels.append(label)
        pixels = (torch.stack(images).float() / 255 - self.mean) / self.std
        return {"pixel_values": pixels, "boxes": boxes, "labels": labels}


def _as_is(batch: dict) -> dict:
    return batch


class DetectionDataModule(CachedDataModule):
    """Boxes on images for `task=detection`. Images of a source share one size (tiles, or resized at decode with
    `img_size`); a source without a validation split gives `val_fraction` of its training images to it, one
    without a test split is tested on its validation split. Few labels: `image_fraction` of the training images."""

    cache_prefix = "detection"
    cache_title = "detection"

    def __init__(self, source: str = "deepforest", root: str | None = None, img_size: int | None = None,
                 in_chans: int | None = None, val_fraction: float = 0.2, image_fraction: float | None = None,
                 augment: dict | None = None, seed: int = 1234, batch_size: int = 4,
                 eval_batch_size: int | None = None, num_workers: int = 0,
                 cache_dir: str = "~/.cache/fmlab") -> None:
        super().__init__(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.source, self.root, self.img_size, self.model_in_chans = str(source), root, img_size, in_chans
        self.val_fraction, self.image_fraction = val_fraction, image_fraction
        if image_fraction is not None and not 0 < image_fraction <= 1:
            raise DataError(f"data.image_fraction={image_fraction} must be in (0, 1]")
        self.augment = dict(OmegaConf.to_container(augment) if OmegaConf.is_config(augment) else augment or {})
        self.eval_batch_size = eval_batch_size or batch_size
        self.class_names: list[str] = []

    def cache_spec(self) -> dict:
        if self.source in ("deepforest", "easy_vqa"):
            folder = Path(self.root).expanduser() if self.root else None
            files = fingerprint(str(folder)) if folder else self.source
        elif not Path(self.source).expanduser().exists():  # before fingerprinting, which names other presets
            raise not_a_detection_source(self.source)
        else:
            files = fingerprint(self.source)
        return {"source": self.source, "files": files, "size": self.img_size, "min_area": MIN_KEPT_AREA}

    def build_cache(self, folder: Path) -> dict:
        splits = read_detection_source(self.source, self.root)
        names = sorted({n for items in splits.values() for item in items for n in item.names})
        index = {n: i + 1 for i, n in enumerate(names)}
        sizes = {}
        for split, items in splits.items():
            if self.img_size:
                items = [resize(item, self.img_size) for item in items]
            shapes = {tuple(item.image.shape) for item in items}
            if len(shapes) > 1:
                odd = next(item for item in items if tuple(item.image.shape) != tuple(items[0].image.shape))
                raise DataError(f"{odd.where} is {tuple(odd.image.shape)} but {items[0].where} is "
                                f"{tuple(items[0].image.shape)}; set model.img_size to resize every image")
            torch.save({"images": torch.stack([item.image for item in items]),
                        "boxes": [item.boxes for item in items],
                        "labels": [torch.tensor([index[n] for n in item.names], dtype=torch.int64) for item in items]},
                       folder / f"{split}.pt")
            sizes[split] = len(items)
        return {"splits": sorted(splits), "sizes": sizes, "class_names": names}

    def load(self, folder: Path, meta: dict) -> None:
        self.class_names = list(meta["class_names"])
        splits = {s: torch.load(folder / f"{s}.pt", weights_only=True) for s in meta["splits"]}
        train = splits["train"]
        if self.model_in_chans not in (None, train["images"].shape[1]):
            raise DataError(f"the images of data.source={self.source} have {train['images'].shape[1]} channels but "
                            f"model.in_chans={self.model_in_chans}")
        if "val" not in splits:
            strata = [int(labels[0]) if len(labels) else 0 for labels in train["labels"]]
            train_idx, val_idx = stratified_split(strata, [self.val_fraction], seed=self.seed)
            splits["val"] = subset(train, val_idx)
            train = subset(train, train_idx)
        if self.image_fraction is not None:
            n = max(1, round(self.image_fraction * len(train["images"])))
            keep = np.sort(np.random.default_rng(self.seed).permutation(len(train["images"]))[:n])
            train = subset(train, keep)
            log.info("Training on %d of the images (data.image_fraction=%s)", n, self.image_fraction)
        self.mean, self.std = pixel_stats(train["images"])
        augment = build_augment(self.augment)
        self.train_set = BoxBatches(train["images"], train["boxes"], train["labels"], self.mean, self.std, augment)
        self.val_set = BoxBatches(splits["val"]["images"], splits["val"]["boxes"], splits["val"]["labels"],
                                  self.mean, self.std)
        test = splits.get("test", splits["val"])
        self.test_set = BoxBatches(test["images"], test["boxes"], test["labels"], self.mean, self.std)

    def describe(self) -> DataInfo:
        self.setup()
        c, h, w = self.train_set.images.shape[1:]
        return DataInfo(model={"in_chans": c, "img_size": h if h == w else [h, w]},
                        task={"class_names": self.class_names},
                        state={"labels": self.class_names, "normalization": {"mean": self.mean, "std": self.std},
                               "image_shape": [c, h, w]})

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(self.train_set, drop_last=False, collate_fn=_as_is)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, self.eval_batch_size, collate_fn=_as_is)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set, self.eval_batch_size, collate_fn=_as_is)


def subset(split: dict, indices) -> dict:
    indices = [int(i) for i in indices]
    return {"images": split["images"][indices], "boxes": [split["boxes"][i] for i in indices],
            "labels": [split["labels"][i] for i in indices]}


def resize(item: Annotated, size: int) -> Annotated:
    """The image resized to `size` x `size`, its boxes scaled with it."""
    _, h, w = item.image.shape
    image = v2.functional.resize(item.image, [size, size], antialias=True)
    scale = torch.tensor([size / w, size / h, size / w, size / h])
    return Annotated(image, item.boxes * scale, item.names, item.where)


def build_augment(nodes: dict) -> v2.Transform | None:
    """`data.augment`: torchvision v2 transform nodes (box-aware ones: flips, RandomIoUCrop + Resize...), with
    SanitizeBoundingBoxes appended so boxes pushed out of the image go with their labels."""
    for name, node in nodes.items():
        if node is not None and "_target_" not in node:
            raise DataError(f"data.augment.{name} needs a _target_, e.g. "
                            "torchvision.transforms.v2.RandomHorizontalFlip")
    steps = [hydra.utils.instantiate(node) for node in nodes.values() if node is not None]
    return v2.Compose([*steps, v2.SanitizeBoundingBoxes()]) if steps else None

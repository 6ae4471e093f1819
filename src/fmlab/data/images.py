"""Images for pre-training (pixels only) and few-label fine-tuning (pixels + labels).

Sources are decoded once into uint8 tensors, cached on disk, and served as whole batches: the hot path is
one tensor index, the configured torchvision v2 augmentations, and a vectorised normalisation.
"""

from __future__ import annotations

import inspect
import json
import logging
from functools import lru_cache
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from fmlab.data.base import CachedDataModule, DataInfo
from fmlab.data.image_masks import is_mask_folder, read_hf_masks, read_mask_folder
from fmlab.data.image_sources import ImageSplits, read_image_source
from fmlab.data.sampling import VAL_LABELS, few_label_indices, few_label_val_indices, stratified_split
from fmlab.data.sources import DataError, Preset, find_preset, fingerprint, is_hf_dataset
from fmlab.errors import check_choice, check_count

log = logging.getLogger(__name__)


def pixel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images in [0, 1] units, exact, from 256-bin histograms."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        m = (counts * values).sum() / counts.sum()
        var = (counts * values**2).sum() / counts.sum() - m**2
        mean.append(round(float(m), 6))
        std.append(round(float(var.clamp_min(1e-12).sqrt()), 6))
    return mean, std


def _as_is(batch: dict) -> dict:
    """The collate function: `ImageBatches.__getitems__` already returns a whole batch."""
    return batch


class ImageBatches(Dataset):
    """Batches from in-memory uint8 images: the loader hands `__getitems__` a list of indices. With `views > 1`
    (joint-embedding pre-training) each image is augmented that many times, independently: `views` (B, V, C, H, W)
    replaces `pixel_values`; `fixed_seed` draws the same augmentations for the same batch every time (validation).
    With `masks` (N, H, W) uint8 (segmentation) each image's mask takes the same geometric augmentation (nearest
    neighbour) and comes out as `masks` (B, H, W) int64.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        mean: list[float],
        std: list[float],
        size: tuple[int, int],
        transform: v2.Transform | None = None,
        views: int = 1,
        fixed_seed: int | None = None,
        masks: torch.Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.size, self.transform = images, labels, tuple(size), transform
        self.masks = masks
        self.views, self.fixed_seed = views, fixed_seed
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        images = self.images[index]
        if self.views > 1:
            with torch.random.fork_rng(devices=[], enabled=self.fixed_seed is not None):
                if self.fixed_seed is not None:
                    torch.manual_seed(self.fixed_seed + int(index[0]))
                batch = {"views": torch.stack([self.pixels(images) for _ in range(self.views)], dim=1)}
        elif self.masks is not None:
            batch = dict(zip(("pixel_values", "masks"), self.pixels_and_masks(images, self.masks[index]),
                             strict=True))
        else:
            batch = {"pixel_values": self.pixels(images)}
        if self.labels is not None:
            batch["labels"] = self.labels[index]
        return batch

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> augmented (per-image random parameters), resized, normalised float pixels."""
        if self.transform is not None:
            x = torch.stack([self.transform(image) for image in x])
        if tuple(x.shape[2:]) != self.size:  # the model's resolution, one resize for the whole batch
            x = v2.functional.resize(x, list(self.size), antialias=True)
        return self.normalize(x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255 - self.mean) / self.std

    def pixels_and_masks(self, x: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images and their masks -> the same augmentation on both (masks nearest-neighbour), resized."""
        masks = masks[:, None]
        if self.transform is not None:  # typed per image: v2 passes a plain tensor after the first through as is
            pairs = [self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
                     for image, mask in zip(x, masks, strict=True)]
            x, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        if tuple(x.shape[2:]) != self.size:
            x = v2.functional.resize(x, list(self.size), antialias=True)
            masks = v2.functional.resize(tv_tensors.Mask(masks), list(self.size))  # a Mask resizes nearest
        return self.normalize(x.as_subclass(torch.Tensor)), masks.as_subclass(torch.Tensor)[:, 0].long()

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


@lru_cache(maxsize=4)
def _load_cached(path: str) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The decoded cache folder -> (meta, splits); memoised, so tests and sweeps decode once per process."""
    folder = Path(path)
    meta = json.loads((folder / "meta.json").read_text())

    def load(name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(folder / f"{name}.npy"))

    splits = {s: (load(f"{s}_images"), load(f"{s}_labels"),
                  load(f"{s}_masks") if s in meta.get("masks", ()) else None) for s in meta["splits"]}
    return meta, splits


class ImageDataModule(CachedDataModule):
    """A labeled image source for pre-training (labels ignored) or few-label fine-tuning.

    `source` is a preset (`fashion_mnist`), a class-per-subfolder tree or an HF dataset saved to disk. The
    official training split is split (stratified, seeded) into train and validation; `test` is the official test
    split (the validation split where the source has none). `masks=true` serves each image's class mask as well
    (semantic segmentation): from a source with masks, `easy_vqa` or an images/ + masks/ folder pair.
    """

    cache_title = "image"
    cache_version = 2  # 2: masks beside images (segmentation sources)

    def __init__(
        self,
        source: str = "fashion_mnist",
        root: str | None = None,
        labeled: bool = False,
        label_fraction: float | None = None,
        labels_per_class: int | None = None,
        val_labels: str = "matched",
        val_fraction: float = 0.1,
        img_size: int | list[int] | None = None,
        in_chans: int | None = None,
        channels: int | None = None,
        augment: dict | None = None,
        views: int = 1,
        masks: bool = False,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        skip_bad_files: bool = False,
        seed: int = 1234,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        cache_dir: str = "~/.cache/fmlab",
    ) -> None:
        super().__init__(cache_dir=cache_dir, batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.source, self.root = str(source), root
        self.labeled = labeled
        self.label_fraction, self.labels_per_class = label_fraction, labels_per_class
        check_choice("data.val_labels", val_labels, VAL_LABELS)
        self.val_labels, self.val_fraction = val_labels, val_fraction
        self.img_size = None if img_size is None else (
            (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        )
        self.model_in_chans, self.channels = in_chans, channels
        self.augment = dict(OmegaConf.to_container(augment) if OmegaConf.is_config(augment) else augment or {})
        check_count("data.views", views)
        if views > 1 and labeled:
            raise DataError(f"data.views={views}: several augmented views are for pre-training; fine-tuning takes 1")
        self.views = views
        if masks and views > 1:
            raise DataError(f"data.views={views}: several views are for joint-embedding pre-training, not masks")
        self.masks = masks
        self.mask_names: list[str] = []
        self.mean, self.std = (list(mean) if mean else None), (list(std) if std else None)
        self.skip_bad_files = skip_bad_files
        self.eval_batch_size = eval_batch_size or batch_size
        self.label_names: list[str] = []
        self.train_set = self.val_set = self.test_set = None
        if self.channels not in (None, 1, 3):
            raise DataError(f"data.channels={channels}; choose 1 (grey), 3 (RGB) or null (as stored)")

    # ---- decoding and caching ------------------------------------------------------------------------------

    @property
    def preset(self) -> Preset | None:
        return find_preset(self.source, "images")

    @property
    def cache_prefix(self) -> str:
        # The source's name stays readable in the folder's name.
        return f"images-{self.source if self.preset else Path(self.source).name}"

    @property
    def preset_options(self) -> dict:
        """What a preset's reader and file list take: a folder of its files, else where to download them."""
        return {"root": self.root, "download_dir": self.cache_root}

    def cache_spec(self) -> dict:
        """The source's bytes and what decoding does to them (folders are decoded at the model's channels, size)."""
        if self.preset:
            spec = {"preset": self.source, "files": fingerprint(self.source, **self.preset_options)}
        else:
            spec = {"files": fingerprint(self.source), "channels": self.channels, "size": self.img_size,
                    "masks": self.masks}
        return {**spec, "skip_bad_files": self.skip_bad_files}

    def read_source(self) -> ImageSplits:
        if self.preset:
            return self.preset.read(**self.preset_options)
        root = Path(self.source).expanduser()
        if root.is_dir() and is_mask_folder(root):
            return read_mask_folder(root, self.channels, self.img_size)
        if self.masks and is_hf_dataset(root):
            return read_hf_masks(root, self.channels, self.img_size)
        return read_image_source(self.source, self.channels, self.img_size, self.skip_bad_files)

    def build_cache(self, folder: Path) -> dict:
        """Decode the source into uint8 .npy files, images and labels per split."""
        log.info("Decoding %s", self.source)
        decoded = self.read_source()
        for split, (images, labels) in decoded.splits.items():
            np.save(folder / f"{split}_images.npy", images.numpy())
            np.save(folder / f"{split}_labels.npy", labels.numpy())
        for split, masks in decoded.masks.items():
            np.save(folder / f"{split}_masks.npy", masks.numpy())
        return {
            "source": self.source,
            "splits": sorted(decoded.splits),
            "sizes": {s: len(v[1]) for s, v in decoded.splits.items()},
            "label_names": decoded.label_names,
            "masks": sorted(decoded.masks),
            "mask_names": decoded.mask_names,
        }

    # ---- splits ---------------------------------------------------------------------------------------------

    def _check_channels(self, images: torch.Tensor) -> torch.Tensor:
        """Convert to data.channels (grey <-> RGB), then insist the model takes that many."""
        have = images.shape[1]
        if self.channels is not None and self.channels != have:
            if have == 1 and self.channels == 3:
                images = images.expand(-1, 3, -1, -1).contiguous()
            elif have == 3 and self.channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
                weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
                images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            else:
                raise DataError(f"data.channels={self.channels}: cannot convert {have}-channel images")
        if self.model_in_chans is not None and self.model_in_chans != images.shape[1]:
            raise DataError(
                f"the images of data.source={self.source} have {images.shape[1]} channel(s) but "
                f"model.in_chans={self.model_in_chans}; set data.channels={self.model_in_chans} to convert them "
                f"or model.in_chans={images.shape[1]}"
            )
        return images

    def build_augment(self, size: tuple[int, int]) -> v2.Transform | None:
        """The `augment` dict of `_target_` nodes (torchvision v2 transforms) -> one Compose; size defaults to
        the image size. An entry set to null is left out."""
        steps = []
        for name, node in self.augment.items():
            if node is None:
                continue
            if "_target_" not in node:
                raise DataError(f"data.augment.{name} needs a _target_, e.g. torchvision.transforms.v2.RandomCrop")
            cls = hydra.utils.get_class(node["_target_"])
            extra = {"size": list(size)} if "size" in inspect.signature(cls).parameters and "size" not in node else {}
            steps.append(hydra.utils.instantiate(node, **extra))
        return v2.Compose(steps) if steps else None

    def load(self, folder: Path, meta: dict) -> None:
        """Channels converted, train/validation split, few labels drawn, normalisation fixed, augmentation built."""
        _, splits = _load_cached(str(folder))
        self.label_names = list(meta["label_names"])
        self.mask_names = list(meta.get("mask_names") or [])
        if self.masks and not self.mask_names:
            raise DataError(f"data.source={self.source} has no masks; segmentation needs a source with them: "
                            "data=easy_vqa, or a folder with images/ and masks/ (<name>.png of class ids)")
        images, labels, masks = splits["train"]
        images = self._check_channels(images)
        if "val" in splits:
            train_idx, (val_images, val_labels, val_masks) = np.arange(len(labels)), splits["val"]
            val_images = self._check_channels(val_images)
        else:
            train_idx, val_idx = stratified_split(labels.numpy(), [self.val_fraction], seed=self.seed)
            if len(val_idx) == 0 or len(train_idx) == 0:
                raise DataError(
                    f"data.val_fraction={self.val_fraction} leaves an empty train or validation split of "
                    f"{len(labels)} images (split per class); raise or lower it"
                )
            val_images, val_labels = images[val_idx], labels[val_idx]
            val_masks = None if masks is None else masks[val_idx]
        if self.mean is None or self.std is None:
            self.mean, self.std = pixel_stats(images[train_idx])
        if len(self.mean) != images.shape[1] or len(self.std) != images.shape[1]:
            raise DataError(f"data.mean/data.std have {len(self.mean)}/{len(self.std)} values for "
                            f"{images.shape[1]}-channel images")
        if self.labeled and not self.masks and (not self.label_names or bool((labels < 0).any())):
            raise DataError(f"data.source={self.source} has unlabeled images; fine-tuning needs a class folder each")
        if self.labeled:  # few labels (or few masks), stratified on the image's class
            keep = few_label_indices(labels[train_idx].numpy(), self.label_fraction, self.labels_per_class, self.seed)
            train_idx = train_idx[keep]
            log.info("Fine-tuning on %d labeled images (%s)", len(train_idx), self.label_summary(labels[train_idx]))
        # Images stay at their stored size; batches come out at the model's (model.img_size, else the stored one).
        size = self.img_size or tuple(images.shape[2:])
        augment = self.build_augment(size)
        train_labels = labels[train_idx] if self.labeled and not self.masks else None
        train_masks = masks[train_idx] if self.masks else None
        self.train_set = ImageBatches(images[train_idx], train_labels, self.mean, self.std, size, augment, self.views,
                                      masks=train_masks)
        self.probe_images = (images[train_idx], labels[train_idx], val_images, val_labels)
        test_images, test_labels, test_masks = splits.get("test", (None, None, None))
        if test_images is None:  # the whole validation split, before a few-label draw
            log.info("%s has no test split; testing on the validation split", self.source)
            test_images, test_labels, test_masks = val_images, val_labels, val_masks
        else:
            test_images = self._check_channels(test_images)
        if self.labeled:
            keep_val = few_label_val_indices(val_labels.numpy(), self.label_fraction, self.labels_per_class,
                                             self.seed, self.val_labels)
            if len(keep_val) < len(val_labels):
                log.info("Validating on %d of %d labeled images (data.val_labels=%s)", len(keep_val),
                         len(val_labels), self.val_labels)
                val_images, val_labels = val_images[keep_val], val_labels[keep_val]
                val_masks = None if val_masks is None else val_masks[keep_val]
        if self.views > 1:  # joint-embedding validation: augmented views, the same ones at every validation
            self.val_set = ImageBatches(val_images, None, self.mean, self.std, size, augment, self.views, self.seed)
        else:
            self.val_set = self.eval_set(val_images, val_labels, val_masks, size)
        if test_images is val_images:
            self.test_set = self.val_set
        else:
            self.test_set = self.eval_set(test_images, test_labels, test_masks, size)

    def eval_set(self, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None,
                 size: tuple[int, int]) -> ImageBatches:
        """Unaugmented batches with what the task reads: labels (classification), masks (segmentation) or none."""
        return ImageBatches(images, labels if self.labeled and not self.masks else None, self.mean, self.std, size,
                            masks=masks if self.masks else None)

    def probe_sets(self, max_train: int, max_val: int) -> tuple[ImageBatches, ImageBatches] | None:
        """Labeled, unaugmented (train, validation) images for an online probe of a representation: a stratified
        sample of at most `max_train` / `max_val` of each split (seeded); None when the source has no labels."""
        self.setup()
        train_images, train_labels, val_images, val_labels = self.probe_images
        if not self.label_names or bool((train_labels < 0).any()) or bool((val_labels < 0).any()):
            return None

        def sample(images: torch.Tensor, labels: torch.Tensor, n: int) -> ImageBatches:
            if n < len(labels):
                keep = few_label_indices(labels.numpy(), n / len(labels), None, self.seed)
                images, labels = images[keep], labels[keep]
            return ImageBatches(images, labels, self.mean, self.std, self.train_set.size)

        return sample(train_images, train_labels, max_train), sample(val_images, val_labels, max_val)

    def label_summary(self, labels: torch.Tensor) -> str:
        counts = torch.bincount(labels, minlength=len(self.label_names)).tolist()
        return f"{len(counts)} classes, {min(counts)}-{max(counts)} each"

    # ---- what the model and checkpoints need -----------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the batches: after data.channels and model.img_size."""
        self.setup()
        return (self.train_set.images.shape[1], *self.train_set.size)

    def describe(self) -> DataInfo:
        chans, h, w = self.image_shape
        return DataInfo(
            model={"in_chans": chans, "img_size": h if h == w else [h, w]},
            task=self.task_fields(),
            state={
                "labels": self.mask_names if self.masks else self.label_names,
                "normalization": {"mean": self.mean, "std": self.std},
                "image_shape": [chans, h, w],
            },
        )

    def task_fields(self) -> dict:
        """What the fine-tuning task takes from the data: the classes of the labels, or of the mask pixels."""
        if self.masks:
            return {"class_names": self.mask_names}
        return {"num_labels": len(self.label_names)} if self.labeled else {}

    # ---- loaders ----------------------------------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        # Few labels: keep every image (no drop_last).
        drop_last = not self.labeled and len(self.train_set) >= self.batch_size
        return self.train_loader(self.train_set, drop_last=drop_last, collate_fn=_as_is)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader(self.val_set, self.eval_batch_size, collate_fn=_as_is)

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader(self.test_set, self.eval_batch_size, collate_fn=_as_is)

"""Small synthetic image sources for the vision tests: IDX gzip files, class folders of PNGs."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

# A tiny ViT and MAE and a short CPU run on 28x28 synthetic images: seconds per test.
TINY_VIT = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.patch_size=4",
    "data.batch_size=16", "data.eval_batch_size=64", "data.val_fraction=0.2",
    "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32",
    "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    "logger=csv", "callbacks=[model_checkpoint]",
]
TINY_MAE = ["task.decoder.n_embd=32", "task.decoder.n_layer=1", "task.decoder.n_head=2", "task.num_images=4"]


def pattern_images(n: int, size: int = 28, n_classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size) uint8 images with a learnable structure, and their labels: class c draws stripes of
    period 4 + 2c, horizontal for even classes and vertical for odd ones, at a random phase, with noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % n_classes
    grid = np.arange(size)
    images = np.empty((n, size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        period, phase = 4 + 2 * c, rng.integers(0, 8)
        wave = ((grid + phase) % period < period / 2).astype(np.float64)
        img = wave[:, None] * np.ones(size) if c % 2 == 0 else np.ones(size)[:, None] * wave[None, :]
        img = 40 + 180 * img + rng.normal(0, 10, (size, size))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (gzip when the name ends in .gz) of a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fashion_like(folder: Path, n_train: int = 200, n_test: int = 60) -> Path:
    """The four Fashion-MNIST IDX gzip files, with 10 classes of synthetic patterns."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = pattern_images(n, n_classes=10, seed=seed)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def write_image_folder(folder: Path, n_per_class: int = 40, size: int = 28, rgb: bool = False) -> Path:
    """`folder/<class>/<i>.png` for two pattern classes."""
    from PIL import Image

    images, labels = pattern_images(2 * n_per_class, size=size)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).convert("RGB" if rgb else "L").save(folder / f"class{label}" / f"{i:03d}.png")
    return folder


def write_mask_folder(folder: Path, n: int = 48, size: int = 32, seed: int = 0) -> Path:
    """`folder/images/<i>.png` (RGB) with `folder/masks/<i>.png`: a light background with one square (class 1) or
    one disc (class 2) in a random colour and place; the mask marks its pixels, `classes.txt` names the classes."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cls, r = 1 + i % 2, int(rng.integers(size // 6, size // 3))
        cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        mask = Image.new("L", (size, size), 0)
        box = (cx - r, cy - r, cx + r, cy + r)
        colour = tuple(int(v) for v in rng.integers(0, 120, 3))
        for canvas, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(mask), cls)):
            (canvas.rectangle if cls == 1 else canvas.ellipse)(box, fill=fill)
        image.save(folder / "images" / f"{i:03d}.png")
        mask.save(folder / "masks" / f"{i:03d}.png")
    (folder / "classes.txt").write_text("background\nsquare\ndisc\n")
    return folder


def write_voc_folder(folder: Path, n: int = 24, size: int = 48, seed: int = 0) -> Path:
    """`folder/<i>.png` with `folder/<i>.xml` (Pascal VOC): one or two dark squares ("box") or discs ("disc") on a
    light background, each annotated with its bounding box."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw, objects = ImageDraw.Draw(image), []
        for j in range(1 + i % 2):
            r = int(rng.integers(size // 8, size // 5))
            cx = int(rng.integers(r, size - r)) if j == 0 else size - 1 - objects[0][1][0]
            cy = int(rng.integers(r, size - r))
            name = ("box", "disc")[(i + j) % 2]
            box = (max(cx - r, 0), max(cy - r, 0), min(cx + r, size - 1), min(cy + r, size - 1))
            (draw.rectangle if name == "box" else draw.ellipse)(box, fill=(30, 30, 30))
            objects.append((name, box))
        image.save(folder / f"{i:03d}.png")
        xml = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2] + 1}"
                      f"</xmax><ymax>{b[3] + 1}</ymax></bndbox></object>" for name, b in objects)
        (folder / f"{i:03d}.xml").write_text(
            f"<annotation><filename>{i:03d}.png</filename><size><width>{size}</width><height>{size}</height>"
            f"<depth>3</depth></size>{xml}</annotation>")
    return folder

"""Object detection: VOC and COCO readers and their one-line errors, tiling large images, boxes that move exactly
with their image, mAP on known boxes, the deepforest preset, Faster R-CNN from train.py over a CNN's FPN and a ViT's
simple pyramid (the loss falls, mAP and the PNG at test), and an export that rebuilds the same detector."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from fmlab.data.detection import (
    Annotated,
    BoxBatches,
    DetectionDataModule,
    build_augment,
    read_coco,
    read_voc,
    tile,
)
from fmlab.data.sources import DataError
from fmlab.interop.export import export_checkpoint
from fmlab.models.detection import load_detector
from fmlab.resolve import read_checkpoint
from fmlab.tasks.base import load_task
from fmlab.training import train
from tests.conftest import compose_config, read_metrics, values
from tests.image_data import TINY_VIT, write_voc_folder

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_DEEPFOREST = importlib.util.find_spec("deepforest") is not None


def test_voc_reader_gives_boxes_and_names(tmp_path: Path) -> None:
    folder = write_voc_folder(tmp_path / "voc", n=2, size=40)
    item = read_voc(folder / "001.xml")
    assert item.image.shape == (3, 40, 40) and item.boxes.shape == (2, 4) and set(item.names) == {"box", "disc"}
    x0, y0, x1, y1 = item.boxes[0].long().tolist()
    assert (item.image[:, y0:y1, x0:x1] < 100).any() and (item.image[:, :, :x0] > 150).all()  # the box holds it


@pytest.mark.parametrize("fault, message", [
    ("outside", "000.xml: object 0 has box .* outside its 40x40 image"),
    ("xml", "000.xml: not a readable VOC XML file"),
    ("image", "000.png: not a readable image"),
])
def test_a_bad_annotation_is_one_error_naming_the_file(tmp_path: Path, fault: str, message: str) -> None:
    folder = write_voc_folder(tmp_path / "voc", n=2, size=40)
    xml = folder / "000.xml"
    if fault == "outside":
        xml.write_text(xml.read_text().replace("<xmax>", "<xmax>9", 1))
    elif fault == "xml":
        xml.write_text("<annotation><filename>")
    else:
        (folder / "000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=message):
        DetectionDataModule(source=str(folder), cache_dir=str(tmp_path / "cache")).setup()


def test_a_missing_source_names_the_detection_presets(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.source=nope: not a preset \(deepforest, easy_vqa\)"):
        DetectionDataModule(source="nope", cache_dir=str(tmp_path)).setup()


def test_coco_reader_converts_xywh_and_checks_categories(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (30, 20)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 7, "file_name": "a.png"}], "categories": [{"id": 3, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [2, 4, 10, 6]}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    [item] = read_coco(tmp_path / "c.json")
    assert item.boxes.tolist() == [[2, 4, 12, 10]] and item.names == ["cat"]
    coco["annotations"][0]["category_id"] = 4
    (tmp_path / "c.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="c.json: annotation 1 names an unknown image or category"):
        read_coco(tmp_path / "c.json")


def test_tiles_keep_boxes_mostly_inside_them_clipped() -> None:
    boxes = torch.tensor([[10, 10, 30, 30], [90, 10, 130, 30], [60, 50, 110, 70]], dtype=torch.float32)
    item = Annotated(torch.zeros(3, 100, 150, dtype=torch.uint8), boxes, ["a", "b", "c"], "image")
    tiles = tile(item, 100)
    assert [t.where.split("(")[-1] for t in tiles] == ["tile x=0, y=0)", "tile x=50, y=0)"]  # flush with the edge
    first, second = tiles
    # b is 25 % inside the first tile (dropped) and wholly in the second; c is 80 % in the first, all in the second
    assert first.names == ["a", "c"] and first.boxes.tolist() == [[10, 10, 30, 30], [60, 50, 100, 70]]
    assert second.names == ["b", "c"] and second.boxes.tolist() == [[40, 10, 80, 30], [10, 50, 60, 70]]


def test_boxes_move_exactly_with_their_image() -> None:
    image = torch.full((3, 32, 48), 200, dtype=torch.uint8)
    image[:, 4:12, 6:20] = 0
    boxes = [torch.tensor([[6.0, 4.0, 20.0, 12.0]])]
    augment = build_augment({"h": {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 1.0},
                             "v": {"_target_": "torchvision.transforms.v2.RandomVerticalFlip", "p": 1.0}})
    batch = BoxBatches(image[None], boxes, [torch.tensor([1])], [0.0] * 3, [1 / 255] * 3, augment).__getitems__([0])
    assert batch["boxes"][0].tolist() == [[48 - 20, 32 - 12, 48 - 6, 32 - 4]]
    x0, y0, x1, y1 = batch["boxes"][0][0].long().tolist()
    dark = batch["pixel_values"][0, 0] < 100
    assert dark[y0:y1, x0:x1].all() and dark.sum() == (x1 - x0) * (y1 - y0)


def test_map_on_known_boxes() -> None:
    truth = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    exact = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])}]
    shifted = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 6.5]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1])}]  # IoU 0.65: a hit at 0.5, a miss at 0.75
    metric = MeanAveragePrecision(box_format="xyxy")
    metric.update(exact, truth)
    assert metric.compute()["map"].item() == pytest.approx(1.0)
    metric = MeanAveragePrecision(box_format="xyxy")
    metric.update(shifted, truth)
    result = metric.compute()
    assert result["map_50"].item() == pytest.approx(1.0) and result["map_75"].item() == pytest.approx(0.0)


@pytest.mark.skipif(not HAS_DEEPFOREST, reason="the PyPI package deepforest==2.1.0 is not installed "
                    "(make setup installs it with --no-deps)")
def test_deepforest_preset_tiles_training_and_keeps_two_sites_apart(tmp_path: Path) -> None:
    data = DetectionDataModule(source="deepforest", cache_dir=str(tmp_path))
    data.setup()
    assert data.class_names == ["tree"]
    assert data.train_set.images.shape[1:] == (3, 400, 400) and len(data.train_set) == 54
    assert (len(data.val_set), sum(map(len, data.val_set.boxes))) == (1, 37)
    assert (len(data.test_set), sum(map(len, data.test_set.boxes))) == (1, 61)
    every = torch.cat(data.train_set.boxes)
    assert len(every) > 853 * 0.9 and (every >= 0).all() and (every <= 400).all()



@pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None, reason="easy-vqa==1.0 is not installed")
def test_easy_vqa_boxes_bound_each_derived_mask_and_name_its_shape(tmp_path: Path) -> None:
    from fmlab.data.image_masks import read_easy_vqa

    data = DetectionDataModule(source="easy_vqa", val_fraction=0.1, image_fraction=0.05, seed=0,
                               cache_dir=str(tmp_path))
    data.setup()
    assert data.class_names == ["circle", "rectangle", "triangle"]
    # 4,000 training images less 401 for validation; 5 % of the 3,599 left
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (180, 401, 1000)
    decoded = read_easy_vqa(None)
    masks, shapes = decoded.masks["test"], torch.as_tensor(decoded.splits["test"][1])
    for i in (0, 1, 500, 999):  # one box an image: the mask's bounding box (x1, y1 exclusive), classed by the shape
        ys, xs = torch.nonzero(masks[i], as_tuple=True)
        expected = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        torch.testing.assert_close(data.test_set.boxes[i], expected)
        assert data.test_set.labels[i].tolist() == [int(shapes[i]) + 1]

TINY_DET = [o for o in TINY_VIT if not o.startswith("data.batch_size") and not o.startswith("data.eval_batch")] + [
    "stage=finetune", "task=detection", "data=deepforest", "trainer.max_steps=24", "trainer.max_epochs=-1",
    "trainer.val_check_interval=12", "trainer.check_val_every_n_epoch=null", "task.pyramid_channels=32",
    "task.box_head_width=64", "task.detector.box_batch_size_per_image=64",
    "task.optimizer.lr=1e-3", "pretrained=null", "data.batch_size=4", "data.eval_batch_size=8",
]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_voc_folder(tmp_path_factory.mktemp("det") / "voc", n=24, size=48)


@pytest.fixture(scope="module", params=["resnet", "vit"])
def detected(request, voc: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp(f"det-{request.param}")
    if request.param == "vit":
        model, overrides = ["model=vit", "model.patch_size=8"], TINY_DET
    else:  # the CNN has no transformer fields
        model, overrides = ["model=resnet"], [o for o in TINY_DET if not o.startswith("model.")]
    cfg = compose_config([f"paths.cache_dir={tmp / 'cache'}", *model, *overrides, f"data.source={voc}"],
                         tmp / "run")
    train(cfg)
    return tmp / "run"


def test_detection_trains_from_train_py_and_reports_map(detected: Path) -> None:
    losses = values(read_metrics(detected), "train/loss")
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    report = json.loads((detected / "test_metrics.json").read_text())
    assert {"test/map", "test/map_50", "test/map_75"} <= set(report["metrics"])
    assert report["labels"] == ["box", "disc"] and set(report["ap"]) <= {"box", "disc"}
    assert (detected / "detections.png").stat().st_size > 1000


def test_export_rebuilds_the_same_detector(detected: Path, tmp_path: Path) -> None:
    ckpt = next((detected / "checkpoints").glob("best-*.ckpt"))
    notes = export_checkpoint(ckpt, tmp_path / "out")
    assert any("detector.safetensors" in note for note in notes)
    task = load_task(ckpt, read_checkpoint(ckpt)).eval()
    detector, names = load_detector(tmp_path / "out", task.model)
    assert names == ["box", "disc"]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected, got = task({"pixel_values": x}), detector(list(x))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g["boxes"], e["boxes"])
        torch.testing.assert_close(g["scores"], e["scores"])


def test_eval_py_reproduces_the_detection_runs_test_metrics(detected: Path, tmp_path: Path) -> None:
    from tests.test_eval_generate import assert_eval_reproduces

    assert_eval_reproduces(detected, ("test/map", "test/map_50"), tmp_path / "eval")

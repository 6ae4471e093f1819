"""Semantic segmentation: easy-VQA's masks derived exactly, image / mask folders and their errors, masks that follow
their image through augmentation, the dense decoder over ViT and CNN maps, mean IoU on known inputs, training from
train.py (the loss falls, per-class IoU, the PNG), and an export whose decoder reproduces the task's logits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode, v2

from fmlab.data.image_masks import read_mask_folder, shape_from_questions, shape_mask
from fmlab.data.images import ImageBatches, ImageDataModule
from fmlab.data.sources import DataError
from fmlab.interop.export import export_checkpoint
from fmlab.models.backbone import build_backbone
from fmlab.models.dense import IGNORE_MASK, DenseDecoder, load_decoder
from fmlab.resolve import read_checkpoint
from fmlab.tasks.base import load_task
from fmlab.tasks.segmentation import SegmentationHead
from fmlab.training import train
from tests.conftest import compose_config, read_metrics, values
from tests.image_data import TINY_VIT, write_mask_folder

pytestmark = pytest.mark.usefixtures("one_thread")
HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None

TINY_SEG = [*TINY_VIT, "stage=finetune", "task=segmentation", "data=image_folder", "trainer.max_steps=30",
            "trainer.max_epochs=-1", "trainer.val_check_interval=10", "trainer.check_val_every_n_epoch=null",
            "task.head.width=16", "task.optimizer.lr=3e-3", "pretrained=null", "data.augment=null"]


def test_shape_mask_is_exactly_the_drawn_shape() -> None:
    image = Image.new("RGB", (40, 40), (236, 244, 250))
    ImageDraw.Draw(image).polygon([(5, 30), (20, 4), (35, 30)], fill=(20, 120, 30))
    array = np.asarray(image).transpose(2, 0, 1)
    expected = (array != np.array([236, 244, 250]).reshape(3, 1, 1)).any(0)
    assert expected.sum() > 100 and (shape_mask(array) == expected).all()


def test_the_questions_decide_the_shape_where_they_can() -> None:
    questions = [
        ["what shape is in the image?", "circle", 0],
        ["what color is the triangle?", "blue", 1],
        ["is there not a rectangle in the image?", "yes", 2], ["is no circle present?", "yes", 2],
        ["does the image contain a rectangle?", "no", 3],  # circle or triangle: undecided
        ["is there a red shape?", "yes", 4],
    ]
    assert shape_from_questions(questions) == {0: "circle", 1: "triangle", 2: "triangle"}


needs_easy_vqa = pytest.mark.skipif(not HAS_EASY_VQA, reason="the PyPI package easy-vqa==1.0 is not installed "
                                    "(make setup installs it)")


@pytest.fixture(scope="module")
def easy_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("easy-vqa-cache")  # decoded once for this module's tests


@needs_easy_vqa
def test_easy_vqa_masks_carry_each_image_shape(easy_cache: Path) -> None:
    data = ImageDataModule(source="easy_vqa", labeled=True, masks=True, cache_dir=str(easy_cache))
    data.setup()
    assert data.mask_names == ["background", "circle", "rectangle", "triangle"]
    images, masks = data.test_set.images, data.test_set.masks
    assert images.shape == (1000, 3, 64, 64) and masks.shape == (1000, 64, 64)
    assert len(data.train_set) + len(data.val_set) == 4000
    labels = torch.as_tensor(data.probe_images[1])  # the shape of each training image
    train_masks = data.train_set.masks
    shape_ids = train_masks.flatten(1).max(1).values.long() - 1
    assert (shape_ids == labels).all()  # one shape per image, its pixels classed by it
    assert set(torch.unique(train_masks[0]).tolist()) == {0, int(labels[0]) + 1}
    assert 0.02 < (train_masks > 0).float().mean() < 0.3


@needs_easy_vqa
def test_easy_vqa_segmentation_runs_from_its_configs(easy_cache: Path, tmp_path: Path) -> None:
    cfg = compose_config([f"paths.cache_dir={easy_cache}", "model=vit", "model.patch_size=8", *TINY_SEG,
                          "data=easy_vqa", "data.labels_per_class=16", "trainer.max_steps=20", "test_after_fit=false"],
                         tmp_path / "run")
    assert cfg.data.masks and cfg.optimized_metric == "val/miou"
    train(cfg)
    rows = read_metrics(tmp_path / "run")
    losses = values(rows, "train/loss")
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert values(rows, "val/miou")[-1] > 0.24  # above all-background (1 class of 4 right: ~0.24)


def test_mask_folder_reads_pairs_and_names_classes(tmp_path: Path) -> None:
    root = write_mask_folder(tmp_path / "pairs", n=6, size=24)
    decoded = read_mask_folder(root, None, None)
    images, labels = decoded.splits["train"]
    assert images.shape == (6, 3, 24, 24) and decoded.masks["train"].shape == (6, 24, 24)
    assert decoded.mask_names == ["background", "square", "disc"]
    assert labels.tolist() == [1, 2, 1, 2, 1, 2]  # each image's main class, what few-mask draws stratify on


def test_a_saved_hf_dataset_with_annotation_masks_reads_as_pairs(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    root = write_mask_folder(tmp_path / "pairs", n=8, size=24)
    rows = {"image": [str(p) for p in sorted((root / "images").iterdir())],
            "annotation": [str(p) for p in sorted((root / "masks").iterdir())]}
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "validation": split.select(range(4))}).save_to_disk(tmp_path / "hf")
    data = ImageDataModule(source=str(tmp_path / "hf"), labeled=True, masks=True, cache_dir=str(tmp_path / "c"))
    data.setup()
    folder = read_mask_folder(root, None, None)
    assert torch.equal(data.train_set.masks, folder.masks["train"]) and len(data.val_set) == 4
    assert data.mask_names == ["class_0", "class_1", "class_2"]  # no classes.txt beside the dataset


@pytest.mark.parametrize("fault, message", [
    ("small_mask", "003.png: the mask is 12x12 but its image is 24x24"),
    ("corrupt_image", "002.png: not a readable image"),
    ("missing_mask", "001.png: no mask"),
    ("rgb_mask", "004.png: a mask holds one class id per pixel"),
])
def test_a_bad_pair_is_one_error_naming_the_file(tmp_path: Path, fault: str, message: str) -> None:
    root = write_mask_folder(tmp_path / "pairs", n=6, size=24)
    if fault == "small_mask":
        Image.new("L", (12, 12)).save(root / "masks" / "003.png")
    elif fault == "corrupt_image":
        (root / "images" / "002.png").write_bytes(b"not a png")
    elif fault == "missing_mask":
        (root / "masks" / "001.png").unlink()
    else:
        Image.new("RGB", (24, 24)).save(root / "masks" / "004.png")
    with pytest.raises(DataError, match=message):
        read_mask_folder(root, None, None)


def test_a_source_without_masks_is_refused_by_name(tmp_path: Path) -> None:
    from tests.image_data import write_image_folder

    folder = write_image_folder(tmp_path / "classes", n_per_class=4)
    data = ImageDataModule(source=str(folder), labeled=True, masks=True, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=f"data.source={folder} has no masks"):
        data.setup()


def test_masks_follow_their_image_through_augmentation_exactly() -> None:
    # Each image's pixels are its mask's class ids x 60, so nearest-neighbour crops, resizes and flips must keep
    # the two equal, pixel for pixel; the mask's 255 (ignored) pixels survive too.
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (8, 20, 20), generator=g, dtype=torch.uint8)
    masks[:, :3, :3] = IGNORE_MASK
    images = (masks.clamp(max=4) * 60).to(torch.uint8)[:, None]
    augment = v2.Compose([v2.RandomResizedCrop(16, scale=(0.3, 1.0), interpolation=InterpolationMode.NEAREST),
                          v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()])
    batches = ImageBatches(images, None, [0.0], [1.0 / 255], (16, 16), augment, masks=masks)
    torch.manual_seed(1)
    batch = batches.__getitems__(list(range(8)))
    assert batch["pixel_values"].shape == (8, 1, 16, 16) and batch["masks"].dtype == torch.int64
    from_pixels = (batch["pixel_values"][:, 0] / 60).round().long()
    shown = batch["masks"].clamp(max=4)
    assert torch.equal(from_pixels, shown)
    assert not torch.equal(shown, masks[:, :16, :16].long().clamp(max=4))  # the augmentation did move things


@pytest.mark.parametrize("family", ["vit", "resnet18"])
def test_decoder_predicts_every_pixel_at_the_image_size(family: str) -> None:
    if family == "vit":
        model = build_backbone({"_target_": "fmlab.models.vit.ViTConfig", "img_size": 28, "patch_size": 7,
                                "in_chans": 1, "n_layer": 1, "n_head": 2, "n_embd": 16})
        x = torch.randn(2, 1, 28, 28)
    else:
        model = build_backbone({"_target_": "fmlab.models.cnn.CNNConfig", "size": family, "in_chans": 3,
                                "img_size": 48})
        x = torch.randn(2, 3, 48, 48)
    maps = model.features(x)
    assert [m.shape[1] for m in maps] == model.feature_channels()
    # the maps are the image's size over the stride, rounded up (48 px: the last ResNet map is 2x2, not 1.5x1.5)
    assert [m.shape[-1] for m in maps] == [-(-x.shape[-1] // s) for s in model.feature_strides()]
    decoder = DenseDecoder(model.feature_channels(), model.feature_strides(), num_classes=5, width=32)
    assert decoder(maps, tuple(x.shape[2:])).shape == (2, 5, *x.shape[2:])


def test_mean_iou_and_pixel_accuracy_on_known_masks() -> None:
    head = SegmentationHead([8], [4], ["background", "a", "b"])
    truth = torch.tensor([[[0, 0, 1, 1], [0, 0, 2, 2], [IGNORE_MASK, 0, 2, 2]]])
    preds = torch.tensor([[[0, 0, 1, 0], [0, 0, 2, 2], [1, 0, 2, 1]]])
    metrics = head.metrics("val")
    metrics.update(preds, truth)
    values_ = metrics.compute()
    # IoU = right / (true + predicted - right): background 5 / (5 + 6 - 5), a 1 / (2 + 2 - 1), b 3 / (4 + 3 - 3);
    # the ignored pixel (predicted a) counts nowhere, or a would be 1 / 4
    assert values_["val/miou"].item() == pytest.approx((5 / 6 + 1 / 3 + 3 / 4) / 3)
    assert values_["val/pixel_acc"].item() == pytest.approx(9 / 11)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_mask_folder(tmp_path_factory.mktemp("seg") / "pairs", n=48, size=32)


@pytest.fixture(scope="module", params=["vit", "resnet"])
def segmented(request, pairs: Path, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp(f"seg-{request.param}")
    if request.param == "vit":
        model, overrides = ["model=vit", "model.patch_size=8"], TINY_SEG
    else:  # the CNN has no transformer fields
        model, overrides = ["model=resnet", "model.img_size=32"], [o for o in TINY_SEG if not o.startswith("model.")]
    cfg = compose_config([f"paths.cache_dir={tmp / 'cache'}", *model, *overrides, f"data.source={pairs}"],
                         tmp / "run")
    train(cfg)
    return tmp / "run"


def test_segmentation_trains_from_train_py_and_reports_iou(segmented: Path) -> None:
    losses = values(read_metrics(segmented), "train/loss")
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    report = json.loads((segmented / "test_metrics.json").read_text())
    metrics = report["metrics"]
    assert {"test/miou", "test/pixel_acc", "test/iou_background", "test/iou_square", "test/iou_disc"} <= set(metrics)
    assert metrics["test/iou_background"] > 0.8
    assert report["labels"] == ["background", "square", "disc"]
    assert (segmented / "segmentation.png").stat().st_size > 1000


def test_export_writes_a_decoder_that_reproduces_the_task(segmented: Path, tmp_path: Path) -> None:
    ckpt = next((segmented / "checkpoints").glob("best-*.ckpt"))
    notes = export_checkpoint(ckpt, tmp_path / "out")
    assert any("decoder.safetensors" in note for note in notes)
    task = load_task(ckpt, read_checkpoint(ckpt)).eval()
    decoder, names = load_decoder(tmp_path / "out")
    assert names == ["background", "square", "disc"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = task({"pixel_values": x})
        got = decoder(task.model.features(x), (32, 32))
    torch.testing.assert_close(got, expected)


def test_segmentation_needs_an_image_backbone(tmp_path: Path) -> None:
    from fmlab.errors import UserError

    model = build_backbone({"_target_": "fmlab.models.gpt.GPTConfig", "vocab_size": 32, "block_size": 8,
                            "n_layer": 1, "n_head": 1, "n_embd": 8})
    with pytest.raises(UserError, match="dense heads"):
        model.features(torch.zeros(1, 3, 8, 8))


def test_eval_py_reproduces_the_segmentation_runs_test_metrics(segmented: Path, tmp_path: Path) -> None:
    from tests.test_eval_generate import assert_eval_reproduces

    assert_eval_reproduces(segmented, ("test/miou", "test/pixel_acc", "test/iou_disc"), tmp_path / "eval")


def test_figures_reach_tensorboard_and_wandb_style_loggers(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fmlab.tasks.figures import log_figure

    path = tmp_path / "figure.png"
    Image.new("RGB", (20, 10), (255, 0, 0)).save(path)

    class ImageLogger:  # the part of WandbLogger's interface log_figure uses
        def __init__(self) -> None:
            self.logged: list = []

        def log_image(self, key: str, images: list) -> None:
            self.logged.append((key, images))

    tensorboard, wandb_like = TensorBoardLogger(str(tmp_path / "tb")), ImageLogger()
    log_figure([tensorboard, wandb_like], "test/segmentation", path)
    tensorboard.experiment.flush()
    events = EventAccumulator(tensorboard.log_dir)
    events.Reload()
    [image] = events.Images("test/segmentation")
    assert (image.width, image.height) == (20, 10)
    assert wandb_like.logged == [("test/segmentation", [str(path)])]


def test_the_experiment_report_averages_seeds_per_arm_and_budget(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "segmentation"))
    import report

    for seed, miou in enumerate((0.5, 0.6, 0.7)):
        run = tmp_path / f"vit_scratch-f0.01-s{seed}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "best-step40.ckpt").touch()
        (run / "test_metrics.json").write_text(json.dumps({"metrics": {"test/miou": miou}}))
    (tmp_path / "vit_mae-f0.1-s0").mkdir()   # a run that did not finish: no test metrics, left out
    runs = report.collect(tmp_path)
    assert set(runs) == {f"vit_scratch-f0.01-s{s}" for s in range(3)}
    assert runs["vit_scratch-f0.01-s0"]["best_step"] == 40
    assert "| vit_scratch | 60.0 ± 10.0 (n=3) |" in report.table(runs)

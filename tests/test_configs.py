"""Every shipped config composes; the objective follows model x stage; a missing pair fails at start."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

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


@pytest.mark.parametrize("override", group_overrides())
def test_every_group_option_composes_and_resolves(override: str, tmp_path: Path) -> None:
    cfg = compose_config([override], tmp_path)
    container = resolve(cfg)
    assert container["task"]["_target_"].startswith("fmlab.tasks.")


def test_every_task_file_is_a_model_stage_pair() -> None:
    pairs = {f"{m}_{s}" for m, s in PAIRS}
    assert set(options("task")) <= pairs, "conf/task files must be named <model>_<stage>"


@pytest.mark.parametrize(("model", "stage"), PAIRS)
def test_model_stage_pairs(model: str, stage: str, tmp_path: Path) -> None:
    overrides = [f"model={model}", f"stage={stage}"]
    if f"{model}_{stage}" in options("task"):
        cfg = compose_config(overrides, tmp_path)
        resolve(cfg)
        assert cfg.data._target_.startswith("fmlab.data.")
    else:
        with pytest.raises(MissingConfigException) as err:
            compose_config(overrides, tmp_path)
        assert f"{model}_{stage}" in str(err.value)
        for valid in options("task"):
            assert valid in str(err.value)


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

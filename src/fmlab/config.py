"""What the shipped configs need registered before Hydra composes them (done on import): OmegaConf resolvers, and
the `task=<model>_<stage>` pairs that map a stage to the objective a model family declares in `objectives:`;
plus composing conf/train.yaml outside a Hydra job (benchmarks, tests)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def wandb_offline() -> bool:
    """W&B runs offline unless WANDB_MODE=online asks to stream."""
    return os.environ.get("WANDB_MODE", "offline") != "online"


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group(task_name: str) -> str | None:
    """W&B group shared by the jobs of one sweep (`<task>-<sweep time>`); None outside a sweep."""
    if not is_multirun():
        return None
    return f"{task_name}-{Path(HydraConfig.get().sweep.dir).name}"


def preset_value(key: str, _parent_: DictConfig) -> Any:
    """`${fmlab.preset:n_layer}` in a model node: that field of the preset `size` of the node's config class (the
    class's default where the preset leaves it out)."""
    from hydra.utils import get_class

    from fmlab.models.transformer import preset

    config_class = get_class(_parent_["_target_"])
    values = preset(config_class, _parent_["size"])
    if key in values:
        return values[key]
    field = next(f for f in dataclasses.fields(config_class) if f.name == key)
    return None if field.default is dataclasses.MISSING else field.default


def text_template(pooling: str) -> str:
    """Special tokens around one text for our BPE: a class token to read (cls, mean), or an end to read up to."""
    return "$A <|endoftext|>" if pooling == "last" else "<cls> $A <sep>"


def pair_template(pooling: str) -> str:
    return "$A <sep> $B <|endoftext|>" if pooling == "last" else "<cls> $A <sep> $B:1 <sep>:1"


def cpu_precision(on_cpu: str, accelerator: str) -> str:
    """A model family's CPU precision (`cpu_precision`, conf/trainer/cpu_precision/) where the run is on a CPU;
    bf16-mixed on an accelerator."""
    if accelerator == "cpu":
        return on_cpu
    import torch

    return on_cpu if accelerator == "auto" and not torch.cuda.is_available() else "bf16-mixed"


RESOLVERS = {
    "fmlab.cpu_precision": cpu_precision,
    "fmlab.wandb_offline": wandb_offline,
    "fmlab.sweep_group": sweep_group,
    "fmlab.preset": preset_value,
    "fmlab.min": min,
    "fmlab.template": text_template,
    "fmlab.pair_template": pair_template,
}


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def option_file(group: str, name: str, conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """conf/<group>/<name>.yaml as plain data, over the options of the same group its defaults list names (a shallow
    merge, the file's own keys last): what the option sets, read without composing."""
    node = yaml.safe_load((conf_dir / group / f"{name}.yaml").read_text()) or {}
    merged: dict[str, Any] = {}
    for entry in node.pop("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and (conf_dir / group / f"{entry}.yaml").is_file():
            merged.update(option_file(group, entry, conf_dir))
    return {**merged, **node}


def model_objectives(conf_dir: Path = CONF_DIR) -> dict[str, dict[str, str]]:
    """`objectives:` of every model file: model option -> {stage: objective} (a file's defaults included)."""
    return {
        path.stem: dict(option_file("model", path.stem, conf_dir).get("objectives") or {})
        for path in sorted((conf_dir / "model").glob("*.yaml"))
    }


def register_objective_pairs(conf_dir: Path = CONF_DIR) -> None:
    """`task=<model>_<stage>` for every stage a model file declares: a config whose defaults are that objective.
    Registering them here keeps conf/task one file per objective, whatever the number of families."""
    store = ConfigStore.instance()
    for model, objectives in model_objectives(conf_dir).items():
        for stage, objective in objectives.items():
            store.store(group="task", name=f"{model}_{stage}", node={"defaults": [objective]})


register_resolvers()
register_objective_pairs()


def compose_train_config(overrides: list[str], output_dir: Path | str | None = None) -> DictConfig:
    """conf/train.yaml composed as `python train.py <overrides>` composes it, with the run folder set: for code
    that builds fmlab's objects without launching a Hydra job."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with read_write(cfg), open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the task function sees the job config only
    return cfg

"""Checks a run makes before anything slow starts (tokenizing, building the model, W&B): the whole config resolves,
the data options fit the data module the objective reads, and the run folder takes files. Each failure is a
`UserError` naming the option."""

from __future__ import annotations

import glob
import inspect
import tempfile
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from fmlab.config import CONF_DIR, option_file
from fmlab.errors import UserError, check_choice

# Keys of a data node that are not constructor arguments of its data module.
DATA_NODE_KEYS = {"_target_", "_recursive_", "_convert_", "global_batch_size", "module"}


def check_run(cfg: DictConfig) -> None:
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # every interpolation, every ??? value
    check_choice("optimized_mode", cfg.get("optimized_mode", "min"), ("min", "max"))
    check_data_source(cfg)
    check_data_options(cfg)
    check_writable(Path(cfg.paths.output_dir))


def check_data_source(cfg: DictConfig) -> None:
    """A `data.source` written as a path (with a `/`, `.` or `~`) names a file, folder or glob that exists. Light on
    purpose: train.py calls it before importing the data modules and Lightning, so a mistyped path fails in a second;
    a bare name (a preset, or a folder in the working directory) is left to the data module, which knows the presets."""
    data = cfg.get("data")
    source = data.get("source") if isinstance(data, DictConfig) else None
    if not isinstance(source, str) or source.startswith("pkg://") or glob.has_magic(source):
        return
    if any(c in source for c in "/.~") and not Path(source).expanduser().exists():
        raise UserError(f"data.source: no such file or folder: {source}; give a file, a folder or a glob of the "
                        "data, or a data preset (data=<name>)")


def choice(group: str) -> str | None:
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


def accepted(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


def check_data_options(cfg: DictConfig) -> None:
    """Every data option is an argument of the data module the objective reads; else name the data presets that
    fit it (e.g. model=vit data=bbc_news: ViT's objectives read images)."""
    target = cfg.data.get("_target_")
    if not target:
        raise UserError("data._target_: no data module; the objective (conf/task) names it")
    objective = get_class(target)
    data, model, task = choice("data"), choice("model"), choice("task")
    reads = f"{f'model={model} ' if model else ''}task={task} reads"
    cls = get_class(cfg.data.get("module") or target)
    if not issubclass(cls, objective):
        raise UserError(f"data={data}: its module {cls.__name__} does not read {objective.__name__}'s data, which "
                        f"{reads}; choose one of data={'|'.join(fitting_presets(objective))}")
    unknown = sorted(set(cfg.data) - accepted(cls) - DATA_NODE_KEYS)
    if unknown:
        raise UserError(f"data={data}: its option(s) {unknown} are not options of {cls.__name__}, the data that "
                        f"{reads}; choose one of data={'|'.join(fitting_presets(objective))}")


def fitting_presets(objective: type) -> list[str]:
    """The data presets (conf/data) an objective reading `objective` can take."""
    presets = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
    return [name for name in presets if preset_fits(option_file("data", name), objective)]


def preset_fits(options: dict, objective: type) -> bool:
    """A data preset's options are arguments of the module it builds for an objective reading `objective`."""
    cls = get_class(options["module"]) if options.get("module") else objective
    return issubclass(cls, objective) and set(options) - {"module"} <= accepted(cls)


def data_module_node(node: dict) -> dict:
    """A data node as Hydra instantiates it: a preset's `module` (a subclass of the objective's data module that
    reads the same data its own way, e.g. data=streaming) replaces the objective's `_target_`. The objective's file
    comes after the data file in the defaults list, so a data file cannot set `_target_` itself."""
    rest = {k: v for k, v in node.items() if k != "module"}
    return {**rest, "_target_": node["module"]} if node.get("module") else rest


def check_writable(run_dir: Path) -> None:
    """The run folder exists and takes files (checkpoints, logs)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"hydra.run.dir={run_dir}: cannot write there ({err.strerror or err}); choose a writable "
                        "folder (hydra.run.dir or paths.log_dir)") from err
    for sub in ("checkpoints", "csv"):
        if (run_dir / sub).exists() and not (run_dir / sub).is_dir():
            raise UserError(f"hydra.run.dir={run_dir}: {run_dir / sub} is a file, where the run writes a folder; "
                            "move it or choose another run folder")

"""Hugging Face interop: one module per family (`hf_gpt2`, `hf_bert`, `hf_vit`, `hf_t5`) maps our state dicts and
configs to the `transformers` layout and back; `export` writes a checkpoint as a `from_pretrained` folder.

`FAMILIES` is the one registry that import (`fmlab.resolve`) and export both use. A family module defines
`MODEL_TYPE` (Hugging Face's `model_type`), `CONFIG_TARGET` (our config class), `TWIN_POOLING` (what Hugging
Face's classifier of the family reads), `from_hf(hf_config, state)` and `to_hf(model, head)`; a new family adds one
line here. A head without a Hugging Face class is exported for `hf_modeling` (model_type `fmlab_<model_type>`). A family
with its own folder layout (`timm_cnn`) defines `export_folder` instead of `to_hf`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fmlab.errors import UserError

FAMILIES: dict[str, str] = {  # Hugging Face model_type -> our module for it (imported on first use)
    "gpt2": "fmlab.interop.hf_gpt2",
    "bert": "fmlab.interop.hf_bert",
    "vit": "fmlab.interop.hf_vit",
    "t5": "fmlab.interop.hf_t5",
    "timm": "fmlab.interop.timm_cnn",  # CNN backbones: timm's own folder layout (config.json names an architecture)
}


# Plain state dicts of other projects' layouts (no config beside them): module with `LAYOUT`, `matches(state)` and
# `from_state(state) -> (our model config node, our state dict)`.
STATE_DICT_LAYOUTS: tuple[str, ...] = ("fmlab.interop.efficientnet_pytorch",)


def layout_of(state: dict, where: str) -> ModuleType:
    """The module that reads a plain state dict of another project's layout."""
    for name in STATE_DICT_LAYOUTS:
        module = importlib.import_module(name)
        if module.matches(state):
            return module
    known = [importlib.import_module(n).LAYOUT for n in STATE_DICT_LAYOUTS]
    raise UserError(f"{where}: a plain state dict of no layout fmlab reads (not an fmlab checkpoint); known "
                    f"layouts: {known}")


def family_by_model_type(model_type: str | None, where: str) -> ModuleType:
    if isinstance(model_type, str) and model_type.startswith("fmlab_"):  # our export's custom head, same backbone
        model_type = model_type.removeprefix("fmlab_")
    if model_type not in FAMILIES:
        raise UserError(f"{where}: model_type={model_type!r} in config.json is not supported; supported: "
                        f"{sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[model_type])


def family_by_config(target: str) -> ModuleType:
    """The family module whose `CONFIG_TARGET` is our model config class `target`."""
    for name in FAMILIES.values():
        module = importlib.import_module(name)
        if module.CONFIG_TARGET == target:
            return module
    supported = sorted(importlib.import_module(n).CONFIG_TARGET for n in FAMILIES.values())
    raise UserError(f"model._target_={target} has no Hugging Face export; supported: {supported}")

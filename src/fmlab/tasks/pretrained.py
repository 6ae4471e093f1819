"""Start a task from pretrained weights: an fmlab checkpoint of any pre-training run, a Hugging Face folder
(BERT, GPT-2, ViT; fmlab.interop maps the layouts) or, online, a Hugging Face Hub name.

The architecture comes from the source; only regularisation (dropout, drop-path) follows the fine-tune config.
Per-family converters map foreign layouts onto our module names: `HF_CONVERTERS` by HF `model_type`,
`CHECKPOINT_ADAPTERS` by the checkpoint's model config `_target_` (e.g. an MAE encoder -> a ViT backbone).
Weights load with `weights_only=True` or safetensors; missing or unexpected backbone keys are an error.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from tokenizers import Tokenizer
from torch import nn

from fmlab.data.sources import DataError, resolve_path
from fmlab.models.lora import LORA_PARAMS

log = logging.getLogger(__name__)

# (model config node, state dict) -> (model config node of the fine-tune backbone, its state dict).
Converter = Callable[[dict, dict[str, torch.Tensor]], tuple[dict, dict[str, torch.Tensor]]]
# A callable, or "module:function" imported on first use (keeps this module free of family imports).
HF_CONVERTERS: dict[str, Converter | str] = {
    "bert": "fmlab.interop.hf_bert:from_hf",
    "gpt2": "fmlab.interop.hf_gpt2:from_hf",
    "vit": "fmlab.interop.hf_vit:from_hf",
}
CHECKPOINT_ADAPTERS: dict[str, Converter | str] = {}
# `pretrained=` that is no local path but looks like `name` or `owner/name`: a Hugging Face Hub repository.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"]
# What fine-tuning may change without changing the architecture.
REGULARISATION_FIELDS = ("dropout", "attn_dropout", "drop_path")
# What the data may change: the image resolution (a ViT interpolates its position table, see `resizable_keys`).
RESOLUTION_FIELDS = ("img_size",)
# Why a data-decided field can disagree with the source, and what to do.
MISMATCH_HINTS = {
    "in_chans": "convert the images with data.channels={theirs}",
}


class PretrainedError(DataError):
    """A pretrained source that cannot be used: the message names the path and what is wrong."""


def _converter(fn: Converter | str) -> Converter:
    if isinstance(fn, str):
        module, _, name = fn.partition(":")
        return hydra.utils.get_method(f"{module}.{name}")
    return fn


@dataclass
class Pretrained:
    source: str
    model: dict  # model config node (`_target_` + fields) of the backbone
    state_dict: dict[str, torch.Tensor]
    tokenizer: str | None  # tokenizer JSON, when the source carries one

    def model_config(self, finetune_model: dict, data_overrides: dict) -> dict:
        """The backbone config for fine-tuning: the source's architecture, the fine-tune config's dropout,
        and an error where the data (tokenizer) disagrees with the architecture."""
        if finetune_model.get("_target_") != self.model["_target_"]:
            raise PretrainedError(
                f"pretrained={self.source} holds a {self.model['_target_']} backbone but the run's model is "
                f"{finetune_model.get('_target_')}; choose the matching model=<family>"
            )
        cfg = dict(self.model)
        cfg.update({k: finetune_model[k] for k in REGULARISATION_FIELDS if k in finetune_model})
        cfg.update({k: data_overrides[k] for k in RESOLUTION_FIELDS if k in data_overrides})
        for key, value in data_overrides.items():
            if key in cfg and cfg[key] != value and key in MISMATCH_HINTS:
                raise PretrainedError(
                    f"the data gives model.{key}={value} but pretrained={self.source} has {key}={cfg[key]}: "
                    + MISMATCH_HINTS[key].format(theirs=cfg[key])
                )
            if key in cfg and cfg[key] != value:
                raise PretrainedError(
                    f"the data gives model.{key}={value} but pretrained={self.source} has {key}={cfg[key]}: "
                    "the tokenizer does not match the checkpoint (leave data.tokenizer at the pretrained source)"
                )
        return cfg

    def check_tokenizer(self, tokenizer_json: str | None) -> None:
        """The data's tokenizer must have the source's vocabulary token for token."""
        if self.tokenizer is None or tokenizer_json is None:
            return
        ours, theirs = Tokenizer.from_str(tokenizer_json).get_vocab(), Tokenizer.from_str(self.tokenizer).get_vocab()
        if ours != theirs:
            differ = sorted(set(ours.items()) ^ set(theirs.items()))[:5]
            raise PretrainedError(
                f"the data's tokenizer ({len(ours)} tokens) is not the one pretrained={self.source} was trained with "
                f"({len(theirs)} tokens; first differences {differ}); leave data.tokenizer at the pretrained source"
            )

    def load_into(self, model: nn.Module) -> None:
        """Copy the backbone weights into `model` with a strict key and shape check.

        Weights of pre-training heads (the model class's `pretraining_heads`) are dropped when `model` has
        removed those heads; heads and LoRA adapters that only `model` has start fresh.
        """
        heads = tuple(getattr(model, "pretraining_heads", ()))
        own = model.state_dict()
        state = {}
        dropped = []
        for key, value in self.state_dict.items():
            if key not in own and key.split(".")[0] in heads:
                dropped.append(key)
            else:
                state[key] = value
        fresh = {k for k in own if k.split(".")[0] in heads or k.rsplit(".", 1)[-1] in LORA_PARAMS}
        missing = sorted(set(own) - set(state) - fresh)
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise PretrainedError(
                f"pretrained={self.source} does not fit {type(model).__name__}: "
                f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}"
            )
        resizable = set(getattr(model, "resizable_keys", ()))  # the model resizes these itself while loading
        wrong = [
            f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items() if v.shape != own[k].shape and k not in resizable
        ]
        if wrong:
            raise PretrainedError(f"pretrained={self.source}: shapes differ (source vs model): {wrong}")
        model.load_state_dict(state, strict=False)
        if dropped:
            log.info("Dropped pre-training head weights: %s", sorted({k.split('.')[0] for k in dropped}))
        log.info("Loaded %d pretrained tensors from %s", len(state), self.source)


def find_checkpoint(run_dir: Path) -> Path:
    """A run folder -> its best checkpoint (the one `best-*.ckpt`), else `last.ckpt`."""
    best = sorted((run_dir / "checkpoints").glob("best*.ckpt"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if len(best) == 1:
        return best[0]
    if last.is_file():
        return last
    raise PretrainedError(f"pretrained={run_dir}: no checkpoints/best*.ckpt or checkpoints/last.ckpt")


def from_checkpoint(path: Path, source: str) -> Pretrained:
    """An fmlab Lightning checkpoint: hparams["model"] and the `model.` part of the state dict."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have many types
        raise PretrainedError(f"pretrained={source}: cannot read {path} as a checkpoint ({err})") from err
    model_cfg = (ckpt.get("hyper_parameters") or {}).get("model")
    if not isinstance(model_cfg, dict) or "_target_" not in model_cfg:
        raise PretrainedError(f"pretrained={source}: {path} has no hyper_parameters.model; is it an fmlab run?")
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    adapter = CHECKPOINT_ADAPTERS.get(model_cfg["_target_"])
    if adapter is not None:
        model_cfg, state = _converter(adapter)(dict(model_cfg), state)
    return Pretrained(source, dict(model_cfg), state, (ckpt.get("fmlab") or {}).get("tokenizer"))


def from_hf_folder(folder: Path, source: str) -> Pretrained:
    """A Hugging Face model folder: config.json + model.safetensors (or pytorch_model.bin) + tokenizer.json."""
    hf_config = json.loads((folder / "config.json").read_text())
    model_type = hf_config.get("model_type")
    if model_type not in HF_CONVERTERS:
        raise PretrainedError(
            f"pretrained={source}: model_type={model_type!r} in config.json is not supported; "
            f"supported: {sorted(HF_CONVERTERS)}"
        )
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise PretrainedError(f"pretrained={source}: {folder} has no model.safetensors or pytorch_model.bin")
    try:
        model_cfg, state = _converter(HF_CONVERTERS[model_type])(hf_config, state)
    except ValueError as err:
        raise PretrainedError(f"pretrained={source}: {err}") from err
    tok_file = folder / "tokenizer.json"
    return Pretrained(source, model_cfg, state, tok_file.read_text() if tok_file.is_file() else None)


def download_from_hub(repo_id: str) -> Path:
    """A Hugging Face Hub name -> the local folder huggingface_hub downloads it to (cached: once per version)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as err:  # not installed, offline, unknown repository, no network: one answer
        raise PretrainedError(
            f"pretrained={repo_id}: no such local path, and as a Hugging Face Hub name it could not be downloaded "
            f"({type(err).__name__}{', HF_HUB_OFFLINE is set' if offline else ''}). Offline, a local folder is "
            f"needed: config.json, model.safetensors and tokenizer.json, e.g. from `hf download {repo_id} "
            "--local-dir <folder>` on a machine with a network"
        ) from err


def load_pretrained(source: str) -> Pretrained:
    """`pretrained=` -> backbone config, weights and tokenizer. Accepts a `.ckpt`, an fmlab run folder,
    a Hugging Face model folder, `pkg://<package>/<folder>` for a model shipped in a Python package, or a
    Hugging Face Hub name (`gpt2`, `google/vit-base-patch16-224`) when the machine is online."""
    path = resolve_path(source)
    if path.is_file():
        return from_checkpoint(path, source)
    if path.is_dir() and (path / "config.json").is_file():
        return from_hf_folder(path, source)
    if path.is_dir() and (path / "checkpoints").is_dir():
        return from_checkpoint(find_checkpoint(path), source)
    if not path.exists() and HUB_NAME.fullmatch(source):
        return from_hf_folder(download_from_hub(source), source)
    raise PretrainedError(
        f"pretrained={source}: not a checkpoint, an fmlab run folder or a Hugging Face model folder (config.json)"
    )

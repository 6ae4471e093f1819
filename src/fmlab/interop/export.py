"""The run behind export.py: write a checkpoint of any fmlab task as a Hugging Face folder that `from_pretrained`
reads: config.json, model.safetensors (nothing pickled), tokenizer files (text) or preprocessor_config.json
(images), label names from the fine-tune run. LoRA adapters are merged first. A head on every position (token
classification, question answering) is written for the family's `...ForTokenClassification` /
`...ForQuestionAnswering`. A classifier head that Hugging Face
has no class for (mean pooling, a head norm) is written for fmlab's own class (`hf_modeling.py`, copied into the
folder and named by `auto_map`: load with `trust_remote_code=True`); a backbone without an exact Hugging Face twin
is refused with the option at fault (fmlab.interop.common.ExportError).
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from safetensors.torch import save_file
from tokenizers import Tokenizer
from torch import nn

from fmlab.interop import family_by_config
from fmlab.interop.common import CUSTOM_MODULE, Classifier, require
from fmlab.models.heads import ClassificationHead
from fmlab.models.lora import merge_lora
from fmlab.resolve import read_checkpoint
from fmlab.runtime import rank_zero_print
from fmlab.tasks.base import load_task

log = logging.getLogger(__name__)

# Hugging Face special-token roles and the tokens that fill them in our tokenizers and in BERT's.
SPECIAL_TOKENS = {
    "pad_token": ("<pad>", "[PAD]"),
    "unk_token": ("[UNK]", "<unk>"),
    "cls_token": ("[CLS]", "<cls>"),
    "sep_token": ("[SEP]", "<sep>"),
    "mask_token": ("[MASK]", "<mask>"),
    "eos_token": ("<|endoftext|>",),
    "bos_token": ("<|endoftext|>",),
}


def classifier_of(task: nn.Module) -> Classifier | None:
    """The fine-tuned head of a classification task, or None for a pre-training task."""
    head = getattr(task, "head", None)
    if not isinstance(head, ClassificationHead):
        return None
    norm = {nn.Identity: False, nn.LayerNorm: True, nn.BatchNorm1d: "batchnorm"}.get(type(head.norm), True)
    linear = head.classifier
    return Classifier(
        head.pooling, norm, linear.weight.detach(), linear.bias.detach(),
        norm_state={k: v.detach() for k, v in head.norm.state_dict().items()},
        norm_eps=getattr(head.norm, "eps", 1e-5), dropout=head.dropout.p,
    )


def per_position_head(task: nn.Module, family) -> tuple[str, str, nn.Linear] | None:
    """(Hugging Face architecture, its attribute, our linear layer) of a head on every position (token
    classification, question answering: `hf_head` names its transformers suffix and attribute); None otherwise."""
    head = getattr(task, "head", None)
    spec = getattr(head, "hf_head", None)
    if spec is None:
        return None
    suffix, attribute = spec
    prefix = getattr(family, "ARCHITECTURE_PREFIX", None)
    require(prefix is not None, f"model={family.MODEL_TYPE}: transformers has no {suffix} class for this family")
    return f"{prefix}{suffix}", attribute, getattr(head, attribute)


def tokenizer_files(tokenizer_json: str, family: str, max_length: int) -> tuple[dict[str, str], dict[str, int]]:
    """(file name -> text) for the tokenizer, and the special-token ids for config.json."""
    tok = Tokenizer.from_str(tokenizer_json)
    roles = {}
    for role, candidates in SPECIAL_TOKENS.items():
        found = next((t for t in candidates if tok.token_to_id(t) is not None), None)
        if found is not None:
            roles[role] = found
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **roles}
    if family == "gpt2":  # GPT-2 would add wte[token_type_ids] to every position: never pass them
        config["model_input_names"] = ["input_ids", "attention_mask"]
    ids = {f"{role}_id": tok.token_to_id(roles[role]) for role in ("pad_token", "bos_token", "eos_token")
           if role in roles}
    files = {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(roles, indent=2),
    }
    return files, ids


def image_processor(extra: dict, model: nn.Module) -> str:
    """preprocessor_config.json for ViTImageProcessor: resize, scale to [0, 1], normalise with the run's stats."""
    cfg = model.config
    h, w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
    norm = extra.get("normalization") or {}
    return json.dumps({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": h, "width": w},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": bool(norm),
        "image_mean": norm.get("mean", [0.5] * cfg.in_chans),
        "image_std": norm.get("std", [0.5] * cfg.in_chans),
    }, indent=2)


def export_task(task: nn.Module, out_dir: str | Path) -> list[str]:
    """Write `task` (a fmlab task with `hparams.model` and `extra_state`; its LoRA adapters are merged in place)
    to `out_dir`; returns notes on what the export leaves out or needs. Raises ExportError, before writing
    anything, where the backbone has no exact twin."""
    family = family_by_config(task.hparams["model"]["_target_"])
    task = task.eval()
    merge_lora(task.model)
    head = classifier_of(task)
    if hasattr(family, "export_folder"):  # a family with its own folder layout (timm's, for CNNs)
        names = task.label_names() if head is not None and hasattr(task, "label_names") else None
        normalization = dict(getattr(task, "extra_state", {}) or {}).get("normalization") or {}
        notes = family.export_folder(task, head, names, normalization, str(out_dir))
        return notes + export_extras(task, out_dir)
    dense = per_position_head(task, family)  # before anything is written: an unsupported family fails here
    hf_config, state = family.to_hf(task.model, head)
    if dense is not None:  # the backbone as its family writes it, and the head's linear layer under its HF name
        architecture, attribute, linear = dense
        hf_config["architectures"] = [architecture]
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
        state[f"{attribute}.weight"], state[f"{attribute}.bias"] = linear.weight.detach(), linear.bias.detach()
    notes = list(family.notes(task.model)) if hasattr(family, "notes") else []
    if getattr(task, "decoder", None) is not None:
        notes.append("the MAE decoder is not exported: the folder is the encoder only (ViTModel)")
    if hf_config["architectures"] == ["ViTModel"]:
        notes.append("ViTModel has a pooler this export has no weights for: load with add_pooling_layer=False")
    extra = dict(getattr(task, "extra_state", {}) or {})
    if head is not None:  # the classification task regresses with one output
        hf_config["problem_type"] = "regression" if head.weight.shape[0] == 1 else "single_label_classification"
    names = task.label_names() if hasattr(task, "label_names") else (  # classes or tags; a span head has none
        [str(i) for i in range(head.weight.shape[0])] if head is not None else None)
    if names:
        hf_config["id2label"] = {str(i): name for i, name in enumerate(names)}
        hf_config["label2id"] = {name: i for i, name in enumerate(names)}
    files: dict[str, str] = {}
    if extra.get("tokenizer"):
        max_length = getattr(task.model.config, "block_size", 512)
        files, ids = tokenizer_files(extra["tokenizer"], family.MODEL_TYPE, max_length)
        hf_config.update(ids)
    gpt2_twin = hf_config["architectures"] == ["GPT2ForSequenceClassification"]  # ours reads the attention mask
    if gpt2_twin and hf_config.get("pad_token_id") is None:
        notes.append("the tokenizer has no pad token: GPT2ForSequenceClassification classifies unpadded batches only")
    if family.MODEL_TYPE == "vit":
        files["preprocessor_config.json"] = image_processor(extra, task.model)
    if "auto_map" in hf_config:  # the head has no transformers class: ship ours, tested here as hf_modeling.py
        files[f"{CUSTOM_MODULE}.py"] = resources.files("fmlab.interop").joinpath("hf_modeling.py").read_text()
        options = ", ".join(head.without_twin(family.TWIN_POOLING)) or "task.head"  # GPT-2: a bias that won't fold
        notes.append(
            f"{options}: no transformers class computes this head, so the folder carries fmlab's "
            f"({CUSTOM_MODULE}.py, {hf_config['architectures'][0]}); load it with trust_remote_code=True "
            "(the tokenizer too: AutoTokenizer reads config.json)"
        )
    files["config.json"] = json.dumps(hf_config, indent=2)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()},
        str(out / "model.safetensors"), metadata={"format": "pt"},
    )
    for name, text in files.items():
        (out / name).write_text(text)
    log.info("Exported %s to %s", hf_config["architectures"][0], out)
    return notes + export_extras(task, out)


def export_extras(task: nn.Module, out_dir: str | Path) -> list[str]:
    """What a task with no Hugging Face or timm twin of its head writes beside the backbone (`export_head`:
    a segmentation decoder); its notes."""
    return list(task.export_head(Path(out_dir))) if hasattr(task, "export_head") else []


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> list[str]:
    """Rebuild the task saved in `ckpt_path` (weights_only) and export it."""
    checkpoint = read_checkpoint(ckpt_path, "ckpt_path")
    task = load_task(ckpt_path, checkpoint)
    return export_task(task, out_dir)


def export(cfg: DictConfig) -> Path:
    """export.py: `cfg.ckpt_path` -> `cfg.out_dir` (default: `hf/` in the checkpoint's run folder)."""
    ckpt = Path(cfg.ckpt_path)
    out = Path(cfg.out_dir) if cfg.get("out_dir") else ckpt.resolve().parent.parent / "hf"
    notes = export_checkpoint(ckpt, out)
    config = json.loads((out / "config.json").read_text())
    architecture = config["architectures"][0] if "architectures" in config else config["architecture"]
    rank_zero_print(f"Exported {ckpt} as {architecture} to {out}")
    for note in notes:
        rank_zero_print(f"Note: {note}")
    return out


"""The run behind generate.py: sample text from a causal-LM checkpoint (a continuation of the prompt) or a seq2seq
one (T5: the prompt is the source, the output its target), with the model's KV cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer
from torch import nn

from fmlab.data.tokenizer import EOS, find_token, token_id
from fmlab.errors import UserError
from fmlab.models.backbone import build_backbone
from fmlab.resolve import model_node, model_state, read_checkpoint

log = logging.getLogger(__name__)


def load_generator(ckpt_path: str | Path, device: str = "cpu") -> tuple[nn.Module, Tokenizer]:
    """The model (in eval mode) and tokenizer of an fmlab checkpoint, without Lightning or the training data."""
    path = Path(ckpt_path)
    checkpoint = read_checkpoint(path, "ckpt_path")
    model = build_backbone(model_node(checkpoint, f"ckpt_path={path}"))
    if not hasattr(model, "generate"):
        raise UserError(f"ckpt_path={path}: holds a {type(model).__name__}, which does not generate text; use a "
                        "GPT or T5 checkpoint")
    model.load_state_dict(model_state(checkpoint))
    tokenizer_json = checkpoint.get("fmlab", {}).get("tokenizer")
    if tokenizer_json is None:
        raise UserError(f"ckpt_path={path}: carries no tokenizer")
    return model.to(device).eval(), Tokenizer.from_str(tokenizer_json)


def generate_text(
    model: nn.Module, tokenizer: Tokenizer, prompt: str = "", max_new_tokens: int = 100, temperature: float = 1.0,
    top_k: int | None = None, num_samples: int = 1, seed: int | None = None, stop_at_eos: bool = True,
    num_beams: int = 1,
) -> list[dict[str, Any]]:
    """`num_samples` continuations of `prompt`: each {"text", "token_ids"} (the new tokens only).

    An empty prompt starts a fresh document (the end-of-text token separates documents in training).
    With `stop_at_eos` a sample ends at its first end-of-text token; otherwise it has `max_new_tokens` tokens.
    A seq2seq model (T5) reads the prompt as its source and writes a target: sampled, greedy (temperature 0), or
    the best of `num_beams` > 1 beams (one sample).
    """
    if getattr(model, "is_encoder_decoder", False):
        return generate_target(model, tokenizer, prompt, max_new_tokens, temperature, top_k, num_samples, seed,
                               stop_at_eos, num_beams)
    eos = token_id(tokenizer, EOS)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    ids = ids or [eos]
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([ids] * num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = model.generate(
        prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
        eos_token_id=eos if stop_at_eos else None, generator=generator,
    )
    samples = []
    for row in out[:, len(ids):].tolist():
        if stop_at_eos and eos in row:
            row = row[: row.index(eos)]
        samples.append({"text": tokenizer.decode(row), "token_ids": row})
    return samples


def generate_target(
    model: nn.Module, tokenizer: Tokenizer, source: str, max_new_tokens: int, temperature: float, top_k: int | None,
    num_samples: int, seed: int | None, stop_at_eos: bool, num_beams: int,
) -> list[dict[str, Any]]:
    """`num_samples` targets of a seq2seq model for `source` (EOS appended, as in training)."""
    eos = find_token(tokenizer, (EOS, "</s>"))
    ids = tokenizer.encode(source, add_special_tokens=False).ids + ([eos] if eos is not None else [])
    device = next(model.parameters()).device
    strategy = "beam" if num_beams > 1 else "greedy" if temperature == 0 else "sample"
    rows = 1 if strategy == "beam" else num_samples
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out = model.generate(
        torch.tensor([ids] * rows, device=device), max_new_tokens=max_new_tokens, strategy=strategy,
        num_beams=num_beams, temperature=temperature, top_k=top_k, eos_id=eos if stop_at_eos else None,
        generator=generator,
    )
    samples = []
    for row in out.tolist():
        if stop_at_eos and eos in row:
            row = row[: row.index(eos)]
        samples.append({"text": tokenizer.decode(row), "token_ids": row})
    return samples


def generate(cfg: DictConfig) -> list[dict[str, Any]]:
    """Print the samples and write them to `<run folder>/samples.json`."""
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_generator(cfg.ckpt_path, device)
    samples = generate_text(
        model, tokenizer, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.num_samples, cfg.seed,
        cfg.stop_at_eos, cfg.get("num_beams", 1),
    )
    before = "" if getattr(model, "is_encoder_decoder", False) else cfg.prompt  # a target does not continue it
    for i, sample in enumerate(samples):
        print(f"--- sample {i} ---\n{before}{sample['text']}")
    out = Path(cfg.paths.output_dir) / "samples.json"
    out.write_text(json.dumps({"prompt": cfg.prompt, "samples": samples}, indent=2))
    log.info("Samples written to %s", out)
    return samples

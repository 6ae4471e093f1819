"""The contract between a model family and everything that trains it: what a task may ask a backbone.

A backbone is an `nn.Module` that turns a batch's inputs into hidden states, `encode(**inputs) -> (B, T, C)`, and
answers the questions trainers would otherwise answer by matching parameter names (timm's `no_weight_decay()` /
`group_matcher()`): which parameters skip weight decay, which layer a parameter belongs to (layer-wise decay),
which linear layers take LoRA adapters, which submodules only pre-training uses, which tables are resized when
loading weights of another resolution, and what one training sample costs in FLOPs. GPT, BERT and ViT implement
it on the shared transformer core; a new family subclasses `Backbone`, sets the class attributes and `encode`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

import torch
from torch import nn

from fmlab.errors import UserError
from fmlab.models.transformer import TransformerConfig, num_params, training_flops

BLOCKS = "transformer.blocks."  # where the shared core keeps its blocks


class Backbone(nn.Module):
    """Base class of every model family (see the module docstring for the contract)."""

    config: TransformerConfig
    # Batch keys `encode` takes (`input_ids`, `attention_mask`, `token_type_ids` or `pixel_values`).
    input_names: ClassVar[tuple[str, ...]] = ()
    # Submodules before the first block (layer 0 for layer-wise decay, and never weight-decayed).
    embedding_names: ClassVar[tuple[str, ...]] = ()
    # Objective-specific submodules (LM or MLM head, NSP): a downstream task removes them, loading drops them.
    pretraining_heads: ClassVar[tuple[str, ...]] = ()
    # State-dict keys the model resizes itself when loading weights trained at another resolution.
    position_tables: ClassVar[tuple[str, ...]] = ()
    # Linear layers (name suffixes) that LoRA adapts: the attention and MLP projections of the shared block.
    lora_targets: ClassVar[tuple[str, ...]] = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    # What the throughput callback counts: "samples", or "images"; text models also report tokens.
    sample_unit: ClassVar[str] = "samples"

    def encode(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Batch inputs (see `input_names`) -> final hidden states (B, T, C)."""
        raise NotImplementedError

    def features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Images -> feature maps (B, C_i, H / s_i, W / s_i), finest first, for dense heads (segmentation);
        `feature_channels` and `feature_strides` give C_i and s_i. Image families implement it."""
        raise UserError(f"{type(self).__name__} has no feature maps: dense heads (task=segmentation) need an image "
                        "backbone (model=vit, resnet or efficientnet)")

    def feature_channels(self) -> list[int]:
        """Channels C_i of the maps `features` returns."""
        raise UserError(f"{type(self).__name__} has no feature maps")

    def feature_strides(self) -> list[int]:
        """Downsampling s_i of the maps `features` returns, relative to the input image."""
        raise UserError(f"{type(self).__name__} has no feature maps")

    @property
    def width(self) -> int:
        """Hidden size C of `encode`'s output."""
        return self.config.n_embd

    @property
    def num_layers(self) -> int:
        return self.config.n_layer

    @property
    def default_pooling(self) -> str:
        """How a sequence-level head should summarise `encode`'s output (`cls`, `mean` or `last`)."""
        return self.config.pooling

    def encode_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The entries of a batch that `encode` takes."""
        return {k: v for k, v in batch.items() if k in self.input_names}

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: embeddings and position tables (1-D tensors always are)."""
        return {n for n, _ in self.named_parameters() if n.split(".")[0] in self.embedding_names}

    def layer_id(self, name: str) -> int:
        """Layer of parameter `name` for layer-wise decay: embeddings 0, block i -> i + 1, the rest n_layer + 1."""
        if name.startswith(BLOCKS):
            return int(name.removeprefix(BLOCKS).split(".", 1)[0]) + 1
        if name.split(".")[0] in self.embedding_names:
            return 0
        return self.num_layers + 1

    def strip_pretraining_heads(self) -> None:
        """Remove the objective-specific submodules: `encode` never uses them."""
        for name in self.pretraining_heads:
            if getattr(self, name, None) is not None:
                setattr(self, name, None)

    def adapted_on_load(self) -> set[str]:
        """State-dict keys the model converts itself while loading (a load-state-dict pre-hook), so their shapes
        may differ from the source's: the position tables, a CNN's stem at another channel count."""
        return set(self.position_tables)

    def tokens_per_sample(self) -> int | None:
        """Tokens one training sample holds (text), or None."""
        return None

    def flops_per_sample(self) -> int:
        """Training FLOPs of one sample through `encode` (forward + backward) and the weights `num_params` counts
        (families leave position tables out: they are looked up, not multiplied)."""
        return training_flops(self.num_params(), self.num_layers, self.width, self.sequence_length())

    def sequence_length(self) -> int:
        """Positions one sample occupies in the transformer."""
        raise NotImplementedError

    def batch_sequence_length(self, inputs: dict[str, torch.Tensor]) -> int:
        """Positions each sample of this batch occupies: the padded width of `input_ids` (fine-tuning pads per
        batch, often far below `block_size`), else `sequence_length()`."""
        ids = inputs.get("input_ids")
        return ids.shape[-1] if ids is not None else self.sequence_length()

    def encode_weights(self, trainable_only: bool = False) -> int:
        """Weights `encode` multiplies: all but lookup tables (embeddings, position tables), which cost no matmul,
        and the pre-training heads, which `encode` never runs; `trainable_only` counts those with a gradient."""
        heads = [getattr(self, name, None) for name in self.pretraining_heads]
        skip = [p for head in heads if head is not None for p in head.parameters()]
        skip += [p for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
        params = dict(self.named_parameters())
        skip += [params[name] for name in self.position_tables if name in params]
        if trainable_only:
            skip += [p for p in params.values() if not p.requires_grad]
        return num_params(self, exclude=tuple(skip))

    def encode_flops(self, seq_len: float | None = None) -> float:
        """Training FLOPs of one sample of `seq_len` positions (default `sequence_length()`) through `encode` alone,
        as it is trained now: weight gradients only for trainable weights (LoRA: the adapters), and no backward at
        all when nothing in it trains (a frozen backbone under a linear probe)."""
        trained = self.encode_weights(trainable_only=True)
        backward = any(p.requires_grad for p in self.parameters())  # the gradient then runs through every block
        return training_flops(self.encode_weights(), self.num_layers, self.width,
                              self.sequence_length() if seq_len is None else seq_len, trained, backward)

    def num_params(self) -> int:
        return num_params(self)


# Keys of a model config node that describe how runs use the family rather than its architecture.
NODE_KEYS = ("_target_", "objectives", "weights")


def config_class(target: str) -> type[TransformerConfig]:
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"model._target_={target}: no such config class ({err})") from err


def build_config(node: dict[str, Any]) -> TransformerConfig:
    """A model config node (`_target_` naming a family config dataclass, plus fields) -> the config; a key that is
    no field of it is an error naming the key and the fields."""
    cls = config_class(node["_target_"])
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(node) - fields - set(NODE_KEYS))
    if unknown:
        raise UserError(f"model.{unknown[0]}: not a field of {cls.__name__}; fields: {sorted(fields)}")
    return cls(**{k: v for k, v in node.items() if k in fields})


def build_backbone(node: dict[str, Any]) -> Backbone:
    """A model config node -> the model (`config.build()`)."""
    return build_config(node).build()

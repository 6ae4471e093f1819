"""What the family converters share: the key map between our modules and a Hugging Face layout, activations, the
classifier head as export sees it (written for the family's own class or for `hf_modeling`'s), and the error an
export raises where our model cannot be written as a Hugging Face model that computes the same."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fmlab.errors import UserError

# Hugging Face `hidden_act` / `activation_function` -> ours (import), and ours -> theirs (export).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
OUR_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


class ExportError(UserError):
    """The model cannot be written as a Hugging Face model that computes the same: the message names the option."""


@dataclass(frozen=True)
class KeyMap:
    """Module names of one family, ours -> theirs (parameters `.weight` / `.bias` follow the module; an `outer`
    entry may also name a bare parameter such as `cls_token`).

    `outer` maps modules outside the blocks; `block` maps modules inside block `{}`; `qkv` names the Hugging
    Face query/key/value modules that our fused `attn.qkv` splits into (None: theirs is fused too); `conv1d`
    names their modules stored as GPT-2 `Conv1D` (weight (in, out), the transpose of nn.Linear's).
    """

    outer: dict[str, str]
    block_theirs: str  # e.g. "h.{}." or "encoder.layer.{}."
    block: dict[str, str]
    qkv: tuple[str, str, str] | None = None
    conv1d: tuple[str, ...] = ()
    block_ours: str = "transformer.blocks.{}."
    skip: tuple[str, ...] = ()  # their key suffixes that are buffers, not weights

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> theirs, without the base-model prefix. A tensor without a twin is an ExportError."""
        out: dict[str, torch.Tensor] = {}
        prefix_ours = self.block_ours.split("{}")[0]
        for key, value in state.items():
            module, _, param = key.rpartition(".")
            if key.startswith(prefix_ours):
                layer, rest = key.removeprefix(prefix_ours).split(".", 1)
                module, _, param = rest.rpartition(".")
                theirs_prefix = self.block_theirs.format(layer)
                if module == "attn.qkv" and self.qkv is not None:
                    for name, part in zip(self.qkv, value.chunk(3, dim=0), strict=True):
                        out[f"{theirs_prefix}{name}.{param}"] = part
                    continue
                if module not in self.block:
                    raise ExportError(f"{key}: no Hugging Face name for this tensor")
                name = self.block[module]
            elif key in self.outer:  # a bare parameter (cls_token, pos_embed)
                out[self.outer[key]] = value.contiguous()
                continue
            else:
                if module not in self.outer:
                    raise ExportError(f"{key}: no Hugging Face name for this tensor")
                theirs_prefix, name = "", self.outer[module]
            if name in self.conv1d and param == "weight":
                value = value.t()
            out[f"{theirs_prefix}{name}.{param}"] = value.contiguous()
        return out

    def from_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Their state dict (base-model prefix removed) -> ours; keys without a match keep their name, so the
        strict key check of the loader reports them."""
        outer = {theirs: ours for ours, theirs in self.outer.items()}
        block = {theirs: ours for ours, theirs in self.block.items()}
        prefix_theirs = self.block_theirs.split("{}")[0]
        out: dict[str, torch.Tensor] = {}
        qkv: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.endswith(self.skip):
                continue
            module, _, param = key.rpartition(".")
            if key.startswith(prefix_theirs):
                layer, rest = key.removeprefix(prefix_theirs).split(".", 1)
                module, _, param = rest.rpartition(".")
                ours_prefix = self.block_ours.format(layer)
                if self.qkv is not None and module in self.qkv:
                    qkv.setdefault(f"{ours_prefix}attn.qkv.{param}", {})[module] = value
                    continue
                name = block.get(module)
            elif key in outer:
                out[outer[key]] = value
                continue
            else:
                ours_prefix, name = "", outer.get(module)
            if name is None:
                out[key] = value
                continue
            if module in self.conv1d and param == "weight":
                value = value.t().contiguous()
            out[f"{ours_prefix}{name}.{param}"] = value
        for key, parts in qkv.items():
            out[key] = torch.cat([parts[name] for name in self.qkv], dim=0)
        return out


def hf_activation(act: str, source: str) -> str:
    """A Hugging Face activation name -> ours, with an error naming the file field."""
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{source}: activation {act!r} is not supported; use one of {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[act]



def with_zero_biases(
    module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str = "transformer."
) -> dict[str, torch.Tensor]:
    """`model.bias=false` has an exact twin with zero biases: add one for every linear layer and norm of `module`
    (named `prefix` in `state`) that lacks it."""
    state = dict(state)
    for name, sub in module.named_modules():
        if isinstance(sub, torch.nn.Linear | torch.nn.LayerNorm) and sub.bias is None:
            state[f"{prefix}{name}.bias"] = torch.zeros(sub.weight.shape[0], dtype=sub.weight.dtype)
    return state


CUSTOM_MODULE = "modeling_fmlab"  # the file export writes `hf_modeling.py` as, named by config.json's auto_map


@dataclass
class Classifier:
    """A fine-tuned classification head, as the export sees it: pooling, norm, dropout and the linear layer."""

    pooling: str
    norm: bool | str  # False, True (LayerNorm) or "batchnorm"
    weight: torch.Tensor  # (num_labels, C)
    bias: torch.Tensor  # (num_labels,)
    norm_state: dict[str, torch.Tensor] = field(default_factory=dict)  # LayerNorm affine or BatchNorm statistics
    norm_eps: float = 1e-5
    dropout: float = 0.0

    def without_twin(self, pooling: str) -> list[str]:
        """The options that the family's own classifier (which pools `pooling`, without a norm) cannot compute."""
        out = [f"task.pooling={self.pooling}"] if self.pooling != pooling else []
        return out + ([f"task.head.norm={str(self.norm).lower()}"] if self.norm else [])

    def custom_config(self, model_type: str, config_class: str, model_class: str, auto_class: str) -> dict:
        """config.json fields that load this head with `hf_modeling.<model_class>` (trust_remote_code=True)."""
        return {
            "model_type": f"fmlab_{model_type}",
            "architectures": [model_class],
            "auto_map": {"AutoConfig": f"{CUSTOM_MODULE}.{config_class}", auto_class: f"{CUSTOM_MODULE}.{model_class}"},
            "fmlab_pooling": self.pooling,
            "fmlab_head_norm": {False: None, True: "layernorm"}.get(self.norm, self.norm),
            "fmlab_head_norm_eps": self.norm_eps,
            "fmlab_head_dropout": self.dropout,
        }

    def custom_state(self, module: str) -> dict[str, torch.Tensor]:
        """The head's tensors under `module` (the head's attribute in hf_modeling: `classifier` or `score`)."""
        state = {f"{module}.norm.{k}": v.contiguous() for k, v in self.norm_state.items()}
        state[f"{module}.out_proj.weight"], state[f"{module}.out_proj.bias"] = self.weight, self.bias
        return state


def exported_pooling(hf_config: dict) -> dict:
    """{"pooling": ...} for a folder this export wrote for hf_modeling, so a fine-tune from it pools as it did."""
    return {"pooling": hf_config["fmlab_pooling"]} if hf_config.get("fmlab_pooling") else {}


def encoder_fields(cfg, family: str) -> dict:
    """The config.json fields that Hugging Face BERT and ViT name alike, from our transformer config."""
    require(cfg.activation in OUR_TO_HF_ACTIVATION, f"model.activation={cfg.activation} has no {family} equivalent")
    return {
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.mlp_width,
        "hidden_act": OUR_TO_HF_ACTIVATION[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attn_dropout,
    }


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ExportError(message)

"""Plain torch.nn models on one shared transformer core."""

from fmlab.models.gpt import GPT, GPTConfig
from fmlab.models.transformer import Transformer, TransformerConfig

__all__ = ["GPT", "GPTConfig", "Transformer", "TransformerConfig"]

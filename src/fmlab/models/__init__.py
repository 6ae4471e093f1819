"""Plain torch.nn models on one shared transformer core."""

from fmlab.models.backbone import Backbone, build_backbone
from fmlab.models.bert import BERT, BertConfig
from fmlab.models.gpt import GPT, GPTConfig
from fmlab.models.heads import ClassificationHead, pool
from fmlab.models.transformer import Transformer, TransformerConfig
from fmlab.models.vit import ViT, ViTConfig

__all__ = [
    "BERT", "Backbone", "BertConfig", "ClassificationHead", "GPT", "GPTConfig", "Transformer", "TransformerConfig",
    "ViT", "ViTConfig", "build_backbone", "pool",
]

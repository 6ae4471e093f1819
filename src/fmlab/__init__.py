"""fmlab: pre-train a foundation model, then fine-tune it on your task."""

__version__ = "0.1.0"

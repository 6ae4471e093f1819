"""LightningDataModules: text corpora, labeled text, images."""

from fmlab.data.sources import DataError

__all__ = ["DataError"]

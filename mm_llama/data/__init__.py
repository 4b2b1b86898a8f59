"""Data pipelines: WebDataset shards -> documents -> weighted mix -> packed, resumable batches."""
from .config import DataConfig, SourceConfig
from .loader import Batch, TextLoader, heldout_batches
from .shards import DataError, check_sources, expand_shards

__all__ = [
    "Batch",
    "DataConfig",
    "DataError",
    "SourceConfig",
    "TextLoader",
    "check_sources",
    "expand_shards",
    "heldout_batches",
]

"""The Llama 3 language model and its building blocks."""
from .args import LlamaArgs
from .init import init_weights
from .kv_cache import KVCache
from .llama import Attention, FeedForward, RMSNorm, Transformer, TransformerBlock
from .masks import AttentionMask, document_mask, document_positions

__all__ = [
    "Attention",
    "AttentionMask",
    "FeedForward",
    "KVCache",
    "LlamaArgs",
    "RMSNorm",
    "Transformer",
    "TransformerBlock",
    "document_mask",
    "document_positions",
    "init_weights",
]

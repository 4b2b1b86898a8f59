"""Adapters that join encoders to the language model: gated cross-attention, video aggregator, speech adapter."""
from .cross_attention import (
    CrossAttention,
    CrossAttentionBlock,
    cross_attention_bias,
    fusion_schedule,
    image_spans,
    vision_mask,
)

__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "cross_attention_bias",
    "fusion_schedule",
    "image_spans",
    "vision_mask",
]

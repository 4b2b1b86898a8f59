"""Adapters that join encoders to the language model: gated cross-attention, video aggregator, speech adapter."""
from .cross_attention import (
    CrossAttention,
    CrossAttentionBlock,
    cross_attention_bias,
    fusion_schedule,
    image_spans,
    vision_mask,
)
from .speech import SpeechAdapter, speech_spans, splice_speech

__all__ = [
    "CrossAttention",
    "CrossAttentionBlock",
    "SpeechAdapter",
    "cross_attention_bias",
    "fusion_schedule",
    "image_spans",
    "speech_spans",
    "splice_speech",
    "vision_mask",
]

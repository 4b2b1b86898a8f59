"""The speech encoder: log-mel front end, Conformer with rotary attention, BEST-RQ pre-training."""
from .args import BestRQArgs, ConformerArgs, FrontEndArgs, SpecAugmentArgs
from .bestrq import BestRQ, BestRQOutput, RandomProjectionQuantizer, code_perplexity, multi_softmax_loss, span_mask, target_mask
from .conformer import ConformerBlock, ConformerEncoder, RotarySelfAttention, encoder_lengths, stack_frames, valid_mask
from .features import (
    AudioError,
    audio_info,
    collate_features,
    decode_audio,
    features,
    log_mel,
    min_samples,
    normalize,
    resample,
    spec_augment,
)

__all__ = [
    "AudioError",
    "BestRQ",
    "BestRQArgs",
    "BestRQOutput",
    "ConformerArgs",
    "ConformerBlock",
    "ConformerEncoder",
    "FrontEndArgs",
    "RandomProjectionQuantizer",
    "RotarySelfAttention",
    "SpecAugmentArgs",
    "audio_info",
    "code_perplexity",
    "collate_features",
    "decode_audio",
    "encoder_lengths",
    "features",
    "log_mel",
    "min_samples",
    "multi_softmax_loss",
    "normalize",
    "resample",
    "spec_augment",
    "span_mask",
    "stack_frames",
    "target_mask",
    "valid_mask",
]

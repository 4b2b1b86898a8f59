"""The speech encoder: log-mel front end, Conformer with rotary attention, BEST-RQ pre-training.

Names are imported on first use, so configs (which import `encoders.speech.args`) do not load torchaudio.
"""
import importlib

_WHERE = {
    "AudioError": "features",
    "BestRQ": "bestrq",
    "BestRQArgs": "args",
    "BestRQOutput": "bestrq",
    "ConformerArgs": "args",
    "ConformerBlock": "conformer",
    "ConformerEncoder": "conformer",
    "FrontEndArgs": "args",
    "RandomProjectionQuantizer": "bestrq",
    "RotarySelfAttention": "conformer",
    "SpecAugmentArgs": "args",
    "audio_info": "features",
    "code_perplexity": "bestrq",
    "collate_features": "features",
    "decode_audio": "features",
    "encoder_lengths": "conformer",
    "features": "features",
    "log_mel": "features",
    "min_samples": "features",
    "multi_softmax_loss": "bestrq",
    "normalize": "features",
    "resample": "features",
    "span_mask": "bestrq",
    "spec_augment": "features",
    "stack_frames": "conformer",
    "target_mask": "bestrq",
    "valid_mask": "conformer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

"""Shapes of the speech front end, the Conformer encoder and BEST-RQ pre-training (SPEC §5.2–5.3)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator


def _positive(model: BaseModel, *names: str) -> None:
    for name in names:
        if getattr(model, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(model, name)}")


class SpecAugmentArgs(BaseModel):
    """SpecAugment (Park et al. 2019): `freq_masks` bands of up to `freq_width` mel bins and
    `time_masks` spans of up to `time_width` frames (at most `max_time_fraction` of the utterance) set to 0
    after normalisation. Defaults: the LibriSpeech "LD" policy."""

    model_config = ConfigDict(extra="forbid")

    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 2
    time_width: int = 100
    max_time_fraction: float = 0.2

    @model_validator(mode="after")
    def _check(self) -> "SpecAugmentArgs":
        for name in ("freq_masks", "freq_width", "time_masks", "time_width"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.max_time_fraction <= 1.0:
            raise ValueError(f"max_time_fraction must be in [0, 1], got {self.max_time_fraction}")
        return self


class FrontEndArgs(BaseModel):
    """Log-mel front end: 16 kHz audio, 80 mel bins, 25 ms window, 10 ms hop (the paper gives 80 bins and
    40 ms frames after stacking 4; window and hop are our choice, SPEC §5.2).

    `normalize: utterance` scales every mel bin of an utterance to mean 0 and std 1 (BEST-RQ needs
    normalised input or its random projection collapses onto a few codes); no statistics file is needed
    and every shard is usable as it is. `none` leaves the log-mel as computed.
    """

    model_config = ConfigDict(extra="forbid")

    sample_rate: int = 16_000
    n_mels: int = 80
    window_ms: float = 25.0
    hop_ms: float = 10.0
    normalize: Literal["utterance", "none"] = "utterance"
    spec_augment: SpecAugmentArgs | None = None
    # The paper's segments are at most 60 s (SPEC §5.3, §5.5): longer audio is cropped (pre-training) or skipped.
    max_seconds: float = 60.0

    @model_validator(mode="after")
    def _check(self) -> "FrontEndArgs":
        _positive(self, "sample_rate", "n_mels", "window_ms", "hop_ms", "max_seconds")
        if self.hop_samples < 1 or self.window_samples < self.hop_samples:
            raise ValueError(f"window_ms ({self.window_ms}) must be >= hop_ms ({self.hop_ms}), hop >= 1 sample")
        return self

    @property
    def window_samples(self) -> int:
        return round(self.sample_rate * self.window_ms / 1000)

    @property
    def hop_samples(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)

    @property
    def max_samples(self) -> int:
        return round(self.sample_rate * self.max_seconds)

    def num_frames(self, n_samples: int) -> int:
        """Log-mel frames for `n_samples` at `sample_rate` (centred frames); 0 below half a window."""
        return n_samples // self.hop_samples + 1 if n_samples > self.window_samples // 2 else 0


class ConformerArgs(BaseModel):
    """The speech encoder (defaults: the paper's 1B Conformer, SPEC §5.2): `stack` log-mel frames are
    concatenated and projected to `dim` (40 ms frames), then `n_layers` Conformer blocks with two
    macaron FFNs of `ffn_dim`, rotary self-attention with `n_heads`, a depthwise conv of `conv_kernel`."""

    model_config = ConfigDict(extra="forbid")

    n_mels: int = 80
    stack: int = 4
    dim: int = 1536
    n_layers: int = 24
    n_heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 7
    dropout: float = 0.1
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5

    @model_validator(mode="after")
    def _check(self) -> "ConformerArgs":
        _positive(self, "n_mels", "stack", "dim", "n_layers", "n_heads", "ffn_dim", "conv_kernel", "rope_theta", "norm_eps")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim ({self.dim}) / n_heads ({self.n_heads}) must be an even integer (rotary pairs)")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd so the conv keeps the frame count, got {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def output_length(self, n_frames: int) -> int:
        """Encoder frames for `n_frames` log-mel frames (a last partial stack is dropped)."""
        return n_frames // self.stack


class BestRQArgs(BaseModel):
    """BEST-RQ targets and masking (SPEC §5.3; defaults: the paper's). `n_codebooks` frozen random projections
    of `stack` stacked, normalised log-mel frames to `code_dim`, each matched by cosine to its own frozen
    codebook of `codebook_size` unit vectors, all drawn from `seed`. Every input frame starts a masked span of
    `mask_span` frames with probability `mask_prob`; masked frames become N(0, `noise_std`²) noise."""

    model_config = ConfigDict(extra="forbid")

    n_codebooks: int = 16
    codebook_size: int = 8192
    code_dim: int = 16
    mask_prob: float = 0.025
    mask_span: int = 32
    noise_std: float = 0.1
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "BestRQArgs":
        _positive(self, "n_codebooks", "codebook_size", "code_dim", "mask_span")
        if not 0.0 < self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in (0, 1], got {self.mask_prob}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        return self

"""The `speech:` section of a model config: front end, Conformer encoder, speech adapter, BEST-RQ targets.

The speech path feeds the LM directly (SPEC §5.1): the adapter's frames replace the `<|speech|>`
placeholders between `<|speech_start|>` and `<|speech_end|>` in the token embeddings. How many
placeholders a clip needs is `SpeechConfig.adapter_frames(n_samples)`, the one rule the data pipeline,
the chat format and the model share.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from encoders.speech.args import BestRQArgs, ConformerArgs, FrontEndArgs

# Llama 3's tokenizer: 256 special ids after the BPE ranks; mm_llama's speech tokens are specials 13–15.
N_SPECIAL_TOKENS = 256
SPEECH_START_INDEX, SPEECH_INDEX, SPEECH_END_INDEX = 13, 14, 15


class SpeechTokenIds(NamedTuple):
    start: int
    speech: int
    end: int


class SpeechAdapterArgs(BaseModel):
    """Conv1d (kernel 3, stride 2: 80 ms frames) → one rotary Transformer layer → linear to the LM width
    (SPEC §5.4; defaults: the paper's, latent 3072 and FFN 4096). The conv's channel widths and the layer's
    head count are not published: encoder width → `dim`, and `n_heads` = 24 (head dim 128)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = 3072
    n_heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 3
    conv_stride: int = 2
    dropout: float = 0.0
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5

    @model_validator(mode="after")
    def _check(self) -> "SpeechAdapterArgs":
        for name in ("dim", "n_heads", "ffn_dim", "conv_kernel", "conv_stride", "rope_theta", "norm_eps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim ({self.dim}) / n_heads ({self.n_heads}) must be an even integer (rotary pairs)")
        if self.conv_kernel % 2 == 0:
            raise ValueError(f"conv_kernel must be odd (centred frames), got {self.conv_kernel}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        return self

    def output_length(self, n: int) -> int:
        """Adapter frames for `n` encoder frames: the conv pads `kernel // 2` on each side."""
        pad = self.conv_kernel // 2
        return (n + 2 * pad - self.conv_kernel) // self.conv_stride + 1 if n > 0 else 0


class SpeechConfig(BaseModel):
    """Conformer speech encoder + adapter (defaults: the paper's 1B encoder and ~100M adapter).

    `bestrq` is read only by the `speech_encoder_pretrain` stage (its heads are dropped afterwards).
    The token ids default to the Llama 3 tokenizer's `<|speech_start|>`, `<|speech|>`, `<|speech_end|>`
    (vocab − 256 + 13, 14, 15).
    """

    model_config = ConfigDict(extra="forbid")

    frontend: FrontEndArgs = Field(default_factory=FrontEndArgs)
    encoder: ConformerArgs = Field(default_factory=ConformerArgs)
    adapter: SpeechAdapterArgs = Field(default_factory=SpeechAdapterArgs)
    bestrq: BestRQArgs = Field(default_factory=BestRQArgs)
    speech_start_id: int | None = None
    speech_id: int | None = None
    speech_end_id: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "SpeechConfig":
        if self.encoder.n_mels != self.frontend.n_mels:
            raise ValueError(f"encoder.n_mels ({self.encoder.n_mels}) must equal frontend.n_mels ({self.frontend.n_mels})")
        return self

    def token_ids_for(self, vocab_size: int) -> SpeechTokenIds:
        """The three speech token ids, defaulting to the Llama 3 tokenizer's for this vocabulary."""
        base = vocab_size - N_SPECIAL_TOKENS
        ids = SpeechTokenIds(
            self.speech_start_id if self.speech_start_id is not None else base + SPEECH_START_INDEX,
            self.speech_id if self.speech_id is not None else base + SPEECH_INDEX,
            self.speech_end_id if self.speech_end_id is not None else base + SPEECH_END_INDEX,
        )
        for name, token in zip(("speech_start_id", "speech_id", "speech_end_id"), ids):
            if not 0 <= token < vocab_size:
                raise ValueError(f"{name} {token} is outside the vocabulary [0, {vocab_size})")
        if len(set(ids)) != 3:
            raise ValueError(f"speech_start_id, speech_id and speech_end_id must differ, got {tuple(ids)}")
        return ids

    def adapter_frames(self, n_samples: int, sample_rate: int | None = None) -> int:
        """`<|speech|>` placeholders (adapter frames) for a clip of `n_samples` at `sample_rate`
        (default: the front end's): log-mel frames → ÷ stack (encoder) → conv stride (adapter).
        0 when the clip is too short for one encoder frame."""
        rate = self.frontend.sample_rate
        if sample_rate is not None and sample_rate != rate:
            n_samples = math.ceil(n_samples * rate / sample_rate)  # torchaudio's resampled length
        return self.adapter.output_length(self.encoder.output_length(self.frontend.num_frames(n_samples)))

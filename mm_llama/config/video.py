"""The `video:` section of a model config: frame sampling, the temporal aggregator, video cross-attention."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from .vision import N_SPECIAL_TOKENS

# mm_llama's tokenizer: `<|video|>` takes Meta's reserved special slot 12 (base + 12).
VIDEO_SPECIAL_INDEX = 12


class VideoConfig(BaseModel):
    """Video adapter (SPEC §4.1 "Video adapter", §4.2 video rows). Needs the model's `vision:` section.

    Up to `max_frames` frames are sampled uniformly from a video and go through the image encoder one by
    one; a perceiver resampler merges every `frames_per_group` consecutive frames into one aggregated
    frame of `n_latents` tokens (paper: 16 for pre-training, 32 for SFT). Video cross-attention blocks
    run before every `every_image_layers`-th image cross-attention block, counted from the top as Meta
    spaces the image blocks (8 image blocks at LM layers 3, 7, …, 31 → video blocks before 15 and 31);
    `cross_attention_layers` lists LM layers explicitly instead.

    UNCONFIRMED in the paper, our choices: `n_latents` 64 (Flamingo's count), the aggregator's width =
    the LM's (the encoder already projects into it), `aggregator_layers` 1 and `aggregator_ffn_mult` 4. With
    those, the video parameters of the Llama 3 8B shape come to 0.65B (paper: 0.6B) — see docs/ARCHITECTURE.md.
    """

    model_config = ConfigDict(extra="forbid")

    max_frames: int = 64
    frames_per_group: int = 32
    n_latents: int = 64
    aggregator_layers: int = 1
    aggregator_heads: int | None = None  # default: the LM's n_heads
    aggregator_ffn_mult: int = 4
    every_image_layers: int = 4
    cross_attention_layers: list[int] | None = None
    video_token_id: int | None = None

    @model_validator(mode="after")
    def _check(self) -> "VideoConfig":
        for name in ("max_frames", "frames_per_group", "n_latents", "aggregator_layers", "aggregator_ffn_mult",
                     "every_image_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.aggregator_heads is not None and self.aggregator_heads <= 0:
            raise ValueError(f"aggregator_heads must be positive, got {self.aggregator_heads}")
        if self.cross_attention_layers is not None:
            layers = self.cross_attention_layers
            if not layers or layers != sorted(set(layers)) or layers[0] < 0:
                raise ValueError(f"cross_attention_layers must be distinct non-negative increasing indices, got {layers}")
        return self

    @property
    def max_groups(self) -> int:
        """Aggregated frames of a video with `max_frames` frames."""
        return -(-self.max_frames // self.frames_per_group)

    def layers_for(self, image_layers: list[int], n_lm_layers: int) -> list[int]:
        """LM layer indices with a video cross-attention block in front (before that layer's image block)."""
        if self.cross_attention_layers is None:
            return list(image_layers)[::-1][:: self.every_image_layers][::-1]
        if self.cross_attention_layers[-1] >= n_lm_layers:
            raise ValueError(f"video cross_attention_layers {self.cross_attention_layers} exceed the LM's "
                             f"{n_lm_layers} layers")
        return list(self.cross_attention_layers)

    def video_token_for(self, vocab_size: int) -> int:
        """`video_token_id`, or mm_llama's tokenizer's `<|video|>` for this vocabulary (vocab − 256 + 12)."""
        token = self.video_token_id
        if token is None:
            token = vocab_size - N_SPECIAL_TOKENS + VIDEO_SPECIAL_INDEX
        if not 0 <= token < vocab_size:
            raise ValueError(f"video_token_id {token} is outside the vocabulary [0, {vocab_size})")
        return token

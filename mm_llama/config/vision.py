"""The `vision:` section of a model config: image encoder, cross-attention placement, the image token."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from encoders.vision.args import VisionEncoderArgs

# Llama 3's tokenizer: `<|image|>` is special token 11 after the BPE ranks (128011 for the 128,256 vocabulary).
N_SPECIAL_TOKENS = 256
IMAGE_SPECIAL_INDEX = 11


class VisionConfig(BaseModel):
    """Image encoder + gated cross-attention adapters (SPEC §4.3; defaults: Llama 3.2 11B Vision).

    `cross_attention_layers` lists the LM layers a cross-attention block runs before; when omitted,
    `n_cross_attention_layers` blocks are spread by Meta's rule (every 4th layer: 3, 7, 11, …).
    `image_token_id` defaults to the tokenizer's `<|image|>` (vocab − 256 + 11). Its embedding is row 0
    of a separate trainable table of `extra_token_rows` rows (Meta and `transformers` keep 8).
    """

    model_config = ConfigDict(extra="forbid")

    encoder: VisionEncoderArgs = Field(default_factory=VisionEncoderArgs)
    n_cross_attention_layers: int = 8
    cross_attention_layers: list[int] | None = None
    image_token_id: int | None = None
    extra_token_rows: int = 8
    # False reproduces `transformers`' Mllama, whose attention branch ignores the no-image row mask.
    mask_attention_rows: bool = True

    @model_validator(mode="after")
    def _check(self) -> "VisionConfig":
        if self.extra_token_rows < 1:
            raise ValueError(f"extra_token_rows must be >= 1, got {self.extra_token_rows}")
        if self.cross_attention_layers is not None:
            layers = self.cross_attention_layers
            if not layers or layers != sorted(set(layers)) or layers[0] < 0:
                raise ValueError(f"cross_attention_layers must be distinct non-negative increasing indices, got {layers}")
        elif self.n_cross_attention_layers <= 0:
            raise ValueError(f"n_cross_attention_layers must be positive, got {self.n_cross_attention_layers}")
        return self

    def layers_for(self, n_lm_layers: int) -> list[int]:
        """The LM layer indices that get a cross-attention block in front of them."""
        from adapters.cross_attention import fusion_schedule

        if self.cross_attention_layers is None:
            return fusion_schedule(n_lm_layers, self.n_cross_attention_layers)
        if self.cross_attention_layers[-1] >= n_lm_layers:
            raise ValueError(f"cross_attention_layers {self.cross_attention_layers} exceed the LM's "
                             f"{n_lm_layers} layers")
        return list(self.cross_attention_layers)

    def image_token_for(self, vocab_size: int) -> int:
        """`image_token_id`, or the Llama 3 tokenizer's `<|image|>` for this vocabulary."""
        token = self.image_token_id
        if token is None:
            token = vocab_size - N_SPECIAL_TOKENS + IMAGE_SPECIAL_INDEX
        if not 0 <= token < vocab_size:
            raise ValueError(f"image_token_id {token} is outside the vocabulary [0, {vocab_size})")
        return token

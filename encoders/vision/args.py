"""Shape of the Llama 3.2-Vision image encoder (SPEC §4.1, §4.3)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class VisionEncoderArgs(BaseModel):
    """A ViT over tiles, multi-layer taps, gated global layers and a projection (defaults: Llama 3.2 11B).

    `intermediate_layers` are the hidden states *entering* block i (0-based), as in Meta's reference:
    [3, 7, 15, 23, 30] are the outputs of blocks 3, 7, 15, 23, 30 counting from 1 (the paper says
    "4th, 8th, 16th, 24th and 31st"); `layers` itself names the last block's output.
    """

    model_config = ConfigDict(extra="forbid")

    tile_size: int = 560
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: float = 4.0
    # Llama 3.2's ViT has no q/k/v/o biases; CLIP checkpoints from open_clip have them.
    attention_bias: bool = False
    max_num_tiles: int = 4
    intermediate_layers: list[int] = [3, 7, 15, 23, 30]
    n_global_layers: int = 8
    # A local open_clip checkpoint (a whole CLIP model or its `visual` tower); None = random init.
    checkpoint: str | None = None

    @field_validator("intermediate_layers")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if v != sorted(set(v)):
            raise ValueError(f"must be strictly increasing, got {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "VisionEncoderArgs":
        for name in ("tile_size", "patch_size", "width", "layers", "heads", "max_num_tiles"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_global_layers < 0 or self.mlp_ratio <= 0:
            raise ValueError("n_global_layers must be >= 0 and mlp_ratio > 0")
        if self.tile_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide tile_size ({self.tile_size})")
        if self.width % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
        bad = [i for i in self.intermediate_layers if not 1 <= i <= self.layers]
        if bad:
            raise ValueError(f"intermediate_layers {bad} outside [1, layers={self.layers}]")
        return self

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """grid² patches plus the class token."""
        return self.grid**2 + 1

    @property
    def output_dim(self) -> int:
        """Width of the concatenated [final, taps...] features before the projection (7,680 for 11B)."""
        return self.width * (1 + len(self.intermediate_layers))

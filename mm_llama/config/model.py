"""A model config file: the language model's shape, and (as they land) the multimodal parts."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator

from ..model.args import LlamaArgs
from .speech import SpeechConfig
from .video import VideoConfig
from .vision import VisionConfig


class ModelConfig(BaseModel):
    """`configs/models/<name>.yaml`: `name`, `lm` (Meta's params.json fields), optional `vision`, `video` and `speech`.

    `video` (frame aggregator + video cross-attention) builds on `vision`: frames go through its image encoder.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    lm: LlamaArgs
    vision: VisionConfig | None = None
    video: VideoConfig | None = None
    speech: SpeechConfig | None = None

    @model_validator(mode="after")
    def _video_needs_vision(self) -> "ModelConfig":
        if self.video is not None and self.vision is None:
            raise ValueError("video: needs a vision: section (frames go through the image encoder)")
        return self

"""A model config file: the language model's shape, and (as they land) the multimodal parts."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..model.args import LlamaArgs
from .speech import SpeechConfig
from .vision import VisionConfig


class ModelConfig(BaseModel):
    """`configs/models/<name>.yaml`: `name`, `lm` (Meta's params.json fields), optional `vision` and `speech`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    lm: LlamaArgs
    vision: VisionConfig | None = None
    speech: SpeechConfig | None = None

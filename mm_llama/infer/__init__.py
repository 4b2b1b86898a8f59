"""Inference: batched KV-cached generation, sampling, streaming text, loading models and media."""
from .generate import Completion, ContextLengthError, Generator, Prompt, TokenEvent, generate
from .loading import Capabilities, UnsupportedInput, find_tokenizer, load_model, save_multimodal
from .media import MediaError, MediaLimits
from .sampling import SamplingConfig, sample_next
from .text_stream import TextStream

__all__ = [
    "Capabilities", "Completion", "ContextLengthError", "Generator", "MediaError", "MediaLimits", "Prompt",
    "SamplingConfig", "TextStream", "TokenEvent", "UnsupportedInput", "find_tokenizer", "generate", "load_model",
    "sample_next", "save_multimodal",
]

"""mm_llama: the Llama 3 herd's compositional training recipe in PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"


def from_pretrained(path, device="cpu", dtype=None):
    """Load a native run/checkpoint folder, a Meta folder or a Hugging Face folder; eval mode."""
    from .checkpoint import from_pretrained as _load

    return _load(path, device=device, dtype=dtype)


def load_tokenizer(path):
    """Load a tokenizer in Llama 3's tiktoken file format (a file, or a folder holding tokenizer.model)."""
    from .text import load_tokenizer as _load

    return _load(path)


__all__ = ["__version__", "from_pretrained", "load_tokenizer"]

"""Text: the Llama 3 tokenizer (tiktoken file format), BPE training in that format, the chat format."""
from __future__ import annotations

from .bpe_train import train_tokenizer, train_tokenizer_from_files
from .chat_format import ChatFormat, EncodedDialog
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer", "train_tokenizer", "train_tokenizer_from_files", "ChatFormat", "EncodedDialog"]

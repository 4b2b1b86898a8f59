"""Tiny checkpoints and a tokenizer for the generation, chat and server tests (random weights)."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders.speech.args import ConformerArgs
from encoders.vision.args import VisionEncoderArgs
from mm_llama.checkpoint import save_native
from mm_llama.config import ModelConfig
from mm_llama.config.speech import SpeechAdapterArgs, SpeechConfig
from mm_llama.config.vision import VisionConfig
from mm_llama.infer import save_multimodal
from mm_llama.model import Transformer
from mm_llama.model.args import LlamaArgs
from mm_llama.model.multimodal import MultimodalModel
from mm_llama.model.speech_lm import SpeechLM
from mm_llama.text import train_tokenizer

N_RANKS = 384
VOCAB = N_RANKS + 256
TEXTS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "A picture shows a red square on a white background; the square is bright and the sky is blue.",
    "Question: what colour is the square? Answer: the square is red. Héllo wörld — ünïcode ✓ 日本語.",
] * 20


def lm_args(max_seq_len: int = 256) -> LlamaArgs:
    return LlamaArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                     max_seq_len=max_seq_len)


def vision_config() -> VisionConfig:
    encoder = VisionEncoderArgs(tile_size=28, patch_size=14, width=32, layers=2, heads=2, max_num_tiles=2,
                                intermediate_layers=[1, 2], n_global_layers=1)
    return VisionConfig(encoder=encoder, n_cross_attention_layers=2)


def speech_config() -> SpeechConfig:
    encoder = ConformerArgs(dim=32, n_layers=1, n_heads=2, ffn_dim=64, dropout=0.0)
    return SpeechConfig(encoder=encoder, adapter=SpeechAdapterArgs(dim=32, n_heads=2, ffn_dim=64))


def make_tokenizer(folder: Path) -> Path:
    return train_tokenizer(TEXTS, N_RANKS, folder / "tokenizer.model")


def text_model(seed: int = 0, max_seq_len: int = 256) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(lm_args(max_seq_len)).eval()


def vision_model(seed: int = 0) -> MultimodalModel:
    """Every gate open, so an image changes the logits."""
    torch.manual_seed(seed)
    model = MultimodalModel(lm_args(), vision_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.7)
    return model.eval()


def speech_model(seed: int = 0) -> SpeechLM:
    torch.manual_seed(seed)
    return SpeechLM(lm_args(), speech_config()).eval()


def text_checkpoint(folder: Path, tokenizer: Path, max_seq_len: int = 256) -> Path:
    save_native(text_model(max_seq_len=max_seq_len), ModelConfig(name="tiny-text", lm=lm_args(max_seq_len)), folder)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


def vision_checkpoint(folder: Path, tokenizer: Path) -> Path:
    save_multimodal(vision_model(), ModelConfig(name="tiny-vision", lm=lm_args(), vision=vision_config()), folder)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


def speech_checkpoint(folder: Path, tokenizer: Path) -> Path:
    """Written as a training stage writes its composed model (`final/` of the speech adapter stage)."""
    from mm_llama.checkpoint.native import atomic_folder
    from mm_llama.train.checkpointing import write_model

    with atomic_folder(folder) as tmp:
        write_model(speech_model(), ModelConfig(name="tiny-speech", lm=lm_args(), speech=speech_config()), tmp)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


def tone(seconds: float, rate: int = 8000, freq: float = 440.0) -> np.ndarray:
    """A sine wave with a little noise `[samples]` (float32)."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).normal(0, 0.05, t.shape)
    return (0.5 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def audio_bytes(samples: np.ndarray, rate: int = 8000, format: str = "WAV") -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=format)
    return out.getvalue()


def picture(height: int = 30, width: int = 50, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()

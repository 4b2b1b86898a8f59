"""Decoding user-supplied media with bounds checked before the expensive part.

An image's size is read from its header before its pixels are decoded, and an audio clip's duration
from its header before its samples are, so an oversized input costs nothing but the check.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on one request's media (each named in the error when exceeded)."""

    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_audio_seconds: float = 60.0


class MediaError(ValueError):
    """Media that cannot be used; `limit` names the bound it broke (None when it is simply unreadable)."""

    def __init__(self, message: str, limit: str | None = None):
        super().__init__(message)
        self.limit = limit


def decode_image(data: bytes, limits: MediaLimits, where: str = "image") -> Image.Image:
    """Image file bytes (PNG, JPEG, WebP, GIF, …) → an RGB PIL image of at most `max_image_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise MediaError(f"{where}: {width}x{height} = {width * height} pixels exceeds max_image_pixels="
                                 f"{limits.max_image_pixels}", "max_image_pixels")
            image.load()
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"{where}: exceeds max_image_pixels={limits.max_image_pixels} ({e})", "max_image_pixels") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"{where}: not a decodable image ({type(e).__name__})") from e


def read_image_file(path: str | Path, limits: MediaLimits) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such image file")
    return decode_image(path.read_bytes(), limits, str(path))


def decode_audio(data: bytes, limits: MediaLimits, where: str = "audio") -> tuple[np.ndarray, int]:
    """Audio file bytes (WAV, FLAC, OGG, MP3) → (mono float32 samples `[n]`, sample rate), at most
    `max_audio_seconds` long."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise MediaError(f"{where}: not decodable audio ({e})") from e
    if info.duration > limits.max_audio_seconds:
        raise MediaError(f"{where}: {info.duration:.1f} s exceeds max_audio_seconds={limits.max_audio_seconds}",
                         "max_audio_seconds")
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples.mean(axis=1), rate


def read_audio_file(path: str | Path, limits: MediaLimits) -> tuple[np.ndarray, int]:
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such audio file")
    return decode_audio(path.read_bytes(), limits, str(path))

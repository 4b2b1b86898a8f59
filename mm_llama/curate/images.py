"""Image-text pairs: exact and near-duplicate image removal, caption filters.

Exact duplicates share the SHA-256 of their encoded bytes. Near duplicates have perceptual hashes
(DCT pHash from `imagehash`) within `max_distance` bits. Candidate pairs are found with
multi-index hashing: split the hash into `max_distance + 1` chunks; by the pigeonhole principle
two hashes within that distance agree exactly on at least one chunk.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np

from ..config import ConfigError
from .config import ClipConfig
from .plugins import load_plugin


def _imagehash():
    try:
        import imagehash
    except ImportError as e:
        raise ConfigError("image de-duplication needs imagehash: pip install 'mm_llama[curate]'") from e
    return imagehash


def decode_image(data: bytes):
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def exact_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(image, hash_size: int = 8) -> int:
    """pHash of a PIL image as an integer of `hash_size²` bits."""
    bits = _imagehash().phash(image, hash_size=hash_size).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


class NearDuplicateIndex:
    """Streams hashes in corpus order; `add(doc_id, h)` returns the id of the earliest indexed
    image within `max_distance` bits, or None (then the image is indexed)."""

    def __init__(self, bits: int, max_distance: int):
        self.max_distance = max_distance
        n = max_distance + 1
        edges = np.linspace(0, bits, n + 1).astype(int)
        self.chunks = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.chunks]
        self.hashes: dict[int, int] = {}

    def _parts(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.chunks]

    def add(self, doc_id: int, h: int) -> int | None:
        parts = self._parts(h)
        candidates = sorted({c for t, p in zip(self.tables, parts) for c in t.get(p, ())})
        for c in candidates:
            if bin(self.hashes[c] ^ h).count("1") <= self.max_distance:
                return c
        self.hashes[doc_id] = h
        for t, p in zip(self.tables, parts):
            t.setdefault(p, []).append(doc_id)
        return None


class OpenClipSimilarity:
    """Cosine similarity of image and caption embeddings from an open_clip model.

    `model`: an open_clip model name (or one registered from `model_config`, a JSON file);
    `checkpoint`: a local weights file (the project's CLIP encoder); nothing is downloaded.
    """

    def __init__(self, model: str, checkpoint: str | None = None, model_config: str | None = None, device: str = "cpu"):
        import open_clip

        if model_config is not None:
            open_clip.add_model_config(model_config)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=checkpoint, device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = device

    def similarity(self, images, captions: list[str]) -> list[float]:
        import torch

        with torch.no_grad():
            pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # [B, 3, H, W]
            img = self.model.encode_image(pixels, normalize=True)  # [B, D]
            txt = self.model.encode_text(self.tokenizer(captions).to(self.device), normalize=True)  # [B, D]
            return (img * txt).sum(-1).float().cpu().tolist()


def build_similarity(config: ClipConfig):
    if config.scorer is None:
        return None
    if config.scorer == "open_clip":
        if "model" not in config.options:
            raise ConfigError("images.clip.options: the open_clip scorer needs 'model' (and usually 'checkpoint')")
        try:
            return OpenClipSimilarity(**config.options)
        except TypeError as e:
            raise ConfigError(f"images.clip.options: {e}") from e
    scorer = load_plugin(config.scorer, "images.clip.scorer", config.options)
    if not callable(getattr(scorer, "similarity", None)):
        raise ConfigError(f"images.clip.scorer: {config.scorer!r} made an object without similarity(images, captions)")
    return scorer

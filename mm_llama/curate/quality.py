"""Pluggable model-based quality scoring (Llama 3 §3.1.1 uses fastText and RoBERTa classifiers).

A scorer is any object with `score(texts) -> list[float]`. The built-in `perplexity` scorer uses
the project's own language model: the perplexity of each document's first `max_tokens` tokens.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .config import QualityConfig
from .plugins import load_plugin


class QualityScorer(Protocol):
    def score(self, texts: list[str]) -> list[float]: ...


class PerplexityScorer:
    """Per-document perplexity under a causal LM: `model(tokens [B, T]) -> logits [B, T, vocab]`.

    `tokenizer.encode(text) -> list[int]`; a `bos_id` attribute, when present, is prepended so the
    first real token is scored too. Batches are right-padded; padding is never scored.
    """

    def __init__(self, model, tokenizer, max_tokens: int = 512, batch_size: int = 8, device: str = "cpu"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_tokens, self.batch_size, self.device = max_tokens, batch_size, device

    @classmethod
    def from_paths(cls, model: str, tokenizer: str, **kwargs) -> "PerplexityScorer":
        import mm_llama

        return cls(mm_llama.from_pretrained(model), mm_llama.load_tokenizer(tokenizer), **kwargs)

    def _ids(self, text: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_id", None)
        ids = ([bos] if bos is not None else []) + list(self.tokenizer.encode(text, bos=False, eos=False))
        return ids[: self.max_tokens + 1]

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        out = []
        for i in range(0, len(texts), self.batch_size):
            seqs = [self._ids(t) for t in texts[i : i + self.batch_size]]
            width = max(len(s) for s in seqs)
            tokens = torch.zeros(len(seqs), width, dtype=torch.long)
            scored = torch.zeros(len(seqs), width, dtype=torch.bool)
            for row, s in enumerate(seqs):
                tokens[row, : len(s)] = torch.tensor(s, dtype=torch.long)
                scored[row, 1 : len(s)] = True
            logits = self.model(tokens.to(self.device)).float().cpu()  # [B, T, vocab]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # [B, T-1]
            mask = scored[:, 1:]
            for row in range(len(seqs)):
                n = int(mask[row].sum())
                out.append(math.exp(float(nll[row][mask[row]].sum()) / n) if n else math.inf)
        return out


def build_scorer(config: QualityConfig) -> QualityScorer | None:
    if config.scorer is None:
        return None
    if config.scorer == "perplexity":
        opts = dict(config.options)
        missing = [k for k in ("model", "tokenizer") if k not in opts]
        if missing:
            raise ConfigError(f"quality.options: the perplexity scorer needs {', '.join(missing)} (paths)")
        return PerplexityScorer.from_paths(opts.pop("model"), opts.pop("tokenizer"), **opts)
    scorer = load_plugin(config.scorer, "quality.scorer", config.options)
    if not callable(getattr(scorer, "score", None)):
        raise ConfigError(f"quality.scorer: {config.scorer!r} made an object without score(texts)")
    return scorer

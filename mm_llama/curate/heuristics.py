"""Heuristic document filters (Llama 3 §3.1.1): duplicated n-gram coverage, counts of words from a
user-supplied list, and token-distribution outliers by KL divergence from the corpus."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .config import HeuristicsConfig
from .minhash import ngram_hashes, word_hashes, words


def duplicated_ngram_fraction(tokens: list[str], n: int) -> float:
    """Fraction of word characters covered by n-grams that occur more than once in the document
    (Gopher's repetition measure; overlapping occurrences all count)."""
    if len(tokens) < n:
        return 0.0
    grams = ngram_hashes(word_hashes(tokens), n)
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    starts = np.flatnonzero(counts[inverse] > 1)
    if len(starts) == 0:
        return 0.0
    # Mark the words of every duplicated n-gram: +1 at its start, -1 after its end.
    delta = np.zeros(len(tokens) + 1, dtype=np.int64)
    np.add.at(delta, starts, 1)
    np.add.at(delta, starts + n, -1)
    covered = np.cumsum(delta[:-1]) > 0
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    return float(lengths[covered].sum() / lengths.sum())


def load_word_list(path: str | Path) -> list[tuple[str, ...]]:
    """One word or phrase per line (blank lines and `#` comments skipped) → word tuples."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"heuristics.word_list.path: no such file: {path}")
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            entries.append(tuple(words(line)))
    return [e for e in entries if e]


def count_listed(tokens: list[str], phrases: list[tuple[str, ...]]) -> int:
    """Occurrences in `tokens` of any listed word or phrase."""
    singles = {p[0] for p in phrases if len(p) == 1}
    total = sum(1 for t in tokens if t in singles)
    for phrase in (p for p in phrases if len(p) > 1):
        n = len(phrase)
        total += sum(1 for i in range(len(tokens) - n + 1) if tuple(tokens[i : i + n]) == phrase)
    return total


def token_histogram(tokens: list[str], buckets: int) -> np.ndarray:
    """`[buckets]` counts of the document's word tokens hashed into buckets."""
    ids = np.fromiter((zlib.crc32(t.encode("utf-8")) % buckets for t in tokens), dtype=np.int64, count=len(tokens))
    return np.bincount(ids, minlength=buckets)


def kl_from_corpus(doc_counts: np.ndarray, corpus_counts: np.ndarray) -> float:
    """KL(p_doc ‖ q_corpus) in nats, with q add-one smoothed so every bucket has mass."""
    total = doc_counts.sum()
    if total == 0:
        return 0.0
    q = (corpus_counts + 1.0) / (corpus_counts.sum() + len(corpus_counts))
    nz = doc_counts > 0
    p = doc_counts[nz] / total
    return float(np.sum(p * np.log(p / q[nz])))


class HeuristicFilter:
    """Applies the configured heuristics; `check` returns `(rule, why)` for a removal or None."""

    def __init__(self, config: HeuristicsConfig, corpus_counts: np.ndarray | None = None):
        self.config = config
        wl = config.word_list
        self.phrases = load_word_list(wl.path) if wl.path else None
        if config.token_kl.max_kl is not None and corpus_counts is None:
            raise ValueError("the token KL filter needs the corpus token counts")
        self.corpus_counts = corpus_counts

    def check(self, text: str) -> tuple[str, str] | None:
        c = self.config
        tokens = words(text)
        if len(tokens) < c.min_words:
            return "min_words", f"{len(tokens)} words < {c.min_words}"
        if c.dup_ngrams.enabled:
            for n, ceiling in sorted(c.dup_ngrams.max_fraction.items()):
                frac = duplicated_ngram_fraction(tokens, n)
                if frac > ceiling:
                    return "dup_ngrams", f"duplicated {n}-gram coverage {frac:.3f} > {ceiling}"
        if self.phrases is not None:
            hits = count_listed(tokens, self.phrases)
            wl = c.word_list
            if wl.max_count is not None and hits > wl.max_count:
                return "word_list", f"{hits} listed words > {wl.max_count}"
            if wl.max_fraction is not None and tokens and hits / len(tokens) > wl.max_fraction:
                return "word_list", f"listed-word fraction {hits / len(tokens):.3f} > {wl.max_fraction}"
        if c.token_kl.max_kl is not None and len(tokens) >= c.token_kl.min_tokens:
            kl = kl_from_corpus(token_histogram(tokens, c.token_kl.buckets), self.corpus_counts)
            if kl > c.token_kl.max_kl:
                return "token_kl", f"KL from corpus {kl:.3f} > {c.token_kl.max_kl}"
        return None

"""Synthetic corpora with planted duplicates: ground truth for the tests and `bench/curate.py`."""
from __future__ import annotations

import numpy as np

_LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """`size` distinct pseudo-words of 3–9 letters."""
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_LETTERS, rng.integers(3, 10))))
    return sorted(words)


def document(rng: np.random.Generator, vocab: list[str], n_words: int, words_per_line: int = 12) -> str:
    """Zipf-distributed words from `vocab`, broken into lines."""
    ranks = np.minimum(rng.zipf(1.2, n_words), len(vocab)) - 1
    tokens = [vocab[r] for r in ranks]
    return "\n".join(" ".join(tokens[i : i + words_per_line]) for i in range(0, n_words, words_per_line))


def near_duplicate(text: str, rng: np.random.Generator, vocab: list[str], edits: int) -> str:
    """A copy with `edits` words replaced at random positions (line breaks kept)."""
    lines = [line.split(" ") for line in text.split("\n")]
    flat = [(i, j) for i, line in enumerate(lines) for j in range(len(line))]
    for k in rng.choice(len(flat), size=min(edits, len(flat)), replace=False):
        i, j = flat[k]
        lines[i][j] = vocab[rng.integers(len(vocab))]
    return "\n".join(" ".join(line) for line in lines)


def planted_corpus(n_unique: int, n_near: int, n_exact: int, seed: int = 0, n_words: int = 200,
                   edits: int = 2, vocab_size: int = 5000) -> tuple[list[str], dict[int, int]]:
    """`n_unique` originals, then `n_near` near copies and `n_exact` exact copies of random
    originals, shuffled → (documents, {copy index: original index})."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary(vocab_size, rng)
    originals = [document(rng, vocab, n_words) for _ in range(n_unique)]
    copies = [(near_duplicate(originals[o], rng, vocab, edits), o) for o in rng.integers(n_unique, size=n_near)]
    copies += [(originals[o], o) for o in rng.integers(n_unique, size=n_exact)]
    # Originals keep the front so each copy comes after its original (the kept one).
    order = rng.permutation(len(copies))
    docs = originals + [copies[i][0] for i in order]
    return docs, {n_unique + k: copies[i][1] for k, i in enumerate(order)}

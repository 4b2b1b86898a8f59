"""ccNet-style line de-duplication (Llama 3 §3.1.1: lines seen more than 6 times in each bucket
of 30M documents are removed — boilerplate such as navigation menus and cookie warnings).

A line is normalised as ccNet does (lower case, digits → 0, whitespace collapsed) before hashing;
each document counts a line once, so the count is the number of documents of the bucket holding it.
Blank lines are never counted or removed.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

_DIGITS = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def normalize_line(line: str) -> str:
    return _SPACE.sub(" ", _DIGITS.sub("0", line.lower())).strip()


def line_hash(line: str) -> int:
    """A stable 63-bit hash of the normalised line, or -1 for a blank line."""
    norm = normalize_line(line)
    if not norm:
        return -1
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def document_line_hashes(text: str) -> np.ndarray:
    """`[n_lines]` int64 hashes of the document's lines in order (-1 for blank lines)."""
    return np.array([line_hash(line) for line in text.splitlines()], dtype=np.int64)


def frequent_lines(per_document: list[np.ndarray], max_repeats: int) -> np.ndarray:
    """Sorted hashes of the lines held by more than `max_repeats` of the given documents."""
    unique = [np.unique(h[h >= 0]) for h in per_document]
    if not unique:
        return np.empty(0, dtype=np.int64)
    values, counts = np.unique(np.concatenate(unique), return_counts=True)
    return values[counts > max_repeats]


def remove_lines(text: str, frequent: np.ndarray) -> tuple[str, list[str]]:
    """Drop every line whose hash is in `frequent` (sorted) → (kept text, removed lines)."""
    if len(frequent) == 0:
        return text, []
    lines = text.splitlines(keepends=True)
    hashes = np.array([line_hash(line) for line in lines], dtype=np.int64)
    drop = np.isin(hashes, frequent, assume_unique=False) & (hashes >= 0)
    if not drop.any():
        return text, []
    kept = "".join(line for line, d in zip(lines, drop) if not d)
    return kept, [line.rstrip("\n") for line, d in zip(lines, drop) if d]

"""Weighted mixing of sources, one document at a time (the paper's 50/25/17/8 mix is such weights).

The source of a consumer's n-th document is a pure function of (seed, consumer, n): a counter-based
draw, so the mixer's random state is the single integer n and a resumed stream draws the same
sources in the same order. (WebDataset's `RandomMix` draws from the global `random` and keeps no
state, which is why it is not used.)
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from .text_stream import Cursor, SourceStream, derive_seed

Position = dict  # {"n": documents drawn so far, "cursors": {source name: Cursor}}


class Mixture:
    """Draws source indices with probabilities proportional to `weights`."""

    def __init__(self, weights: list[float], seed: int, consumer: int):
        total = float(sum(weights))
        self.cumulative = list(itertools.accumulate(w / total for w in weights))
        self.seed, self.consumer = seed, consumer

    def choose(self, n: int) -> int:
        u = derive_seed(self.seed, "mix", self.consumer, n) / 2.0**64
        return min(bisect.bisect_right(self.cumulative, u), len(self.cumulative) - 1)


def start_position(streams: list[SourceStream]) -> Position:
    return {"n": 0, "cursors": {s.source.name: [0, 0, 0] for s in streams}}


def mixed_documents(streams: list[SourceStream], mixture: Mixture, position: Position) -> Iterator[tuple[str, Position]]:
    """Endless `(text, position)`: restarting at `position` yields this very document first."""
    n = int(position["n"])
    cursors: dict[str, Cursor] = {k: list(v) for k, v in position["cursors"].items()}
    readers: dict[str, Iterator[tuple[str, Cursor]]] = {}  # opened lazily: a resumed source re-reads only when drawn
    while True:
        stream = streams[mixture.choose(n)]
        name = stream.source.name
        if name not in readers:
            readers[name] = stream.documents(cursors[name])
        text, at = next(readers[name])
        cursors[name] = at
        yield text, {"n": n, "cursors": {k: list(v) for k, v in cursors.items()}}
        cursors[name] = [at[0], at[1], at[2] + 1]
        n += 1

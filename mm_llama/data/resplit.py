"""Saved stream positions dealt out again to another number of consumers (data-parallel ranks × workers).

Every loader walks its sources as `text_stream` describes: in epoch e a consumer reads the shards of a
seeded permutation that fall to it by consumer count (or, with fewer shards than consumers, every shard,
taking every n-th sample), and its position holds, per source, the cursor `[epoch, shard, sample]` of the
first sample it has not delivered, and the mixer's counter `n` (`mixing`). Since the shards are dealt out
by consumer count, a run resumed with another count cannot continue each old stream as it was.

`resplit` starts each new consumer, per source, in the earliest epoch any old consumer stands in, at the
first shard of its new share that the old consumers have not read to the end, after the leading samples
of it they have delivered between them. No sample is skipped. A sample is read twice only if an old
consumer had delivered it from a shard past that start: a consumer that ran ahead of the others, or one
striding a shard that several share. When the old consumers stood level (at the same shard of their
shares, as a lockstep run over equal shards leaves them) that is at most one partly read shard per old
consumer, and nothing at all when the new consumers are at least as many and still read whole shards. A
loader whose items span a batch boundary (the text packer's document) restarts the item it was in. The
mixer's counter continues from the largest an old consumer reached, so no per-item draw repeats one made before.
"""
from __future__ import annotations

import math

from .mixing import Position


def _standing(cursor: list, consumer: int, n_consumers: int, n_shards: int) -> tuple[int, int, int]:
    """A consumer's cursor as (epoch, index in the epoch's shard order, sample)."""
    epoch, shard, sample = (int(x) for x in cursor)
    index = shard if n_shards < n_consumers else consumer + n_consumers * shard
    return epoch, index, sample


def _delivered(old: list[tuple[int, int, int]], epoch: int, index: int, n_shards: int) -> float:
    """How many leading samples (reading order) of shard `index` of `epoch` the old consumers have delivered between
    them; `math.inf` when they have read it to its end."""
    strided = n_shards < len(old)
    done = math.inf
    for c in range(len(old)) if strided else [index % len(old)]:
        e, i, sample = old[c]
        if (e, i) > (epoch, index):
            continue
        first = sample if (e, i) == (epoch, index) else 0  # the first sample it has not considered
        if strided:  # it takes samples c, c + n, c + 2n, ... only
            first += (c - first) % len(old)
        done = min(done, first)
    return done


def resplit(old: list[Position | None], shards: dict[str, int], n_new: int, consumers) -> list[Position]:
    """Positions of new consumers `consumers` (ids below `n_new`) from those of all old consumers (module docstring).

    `old[c]` is old consumer c's position (c = rank · workers + worker; None: it has delivered nothing),
    `shards` each source's shard count.
    """
    n = max((int(p["n"]) for p in old if p), default=0)
    out: list[Position] = [{"n": n, "cursors": {}} for _ in consumers]
    for name, n_shards in shards.items():
        standing = [_standing((p or {}).get("cursors", {}).get(name, [0, 0, 0]), c, len(old), n_shards)
                    for c, p in enumerate(old)]
        epoch = min(e for e, _, _ in standing)
        for position, c in zip(out, consumers):
            share = range(n_shards) if n_shards < n_new else range(c, n_shards, n_new)
            cursor = [epoch, len(share), 0]  # all of its share read: it begins the next epoch
            for shard, index in enumerate(share):
                done = _delivered(standing, epoch, index, n_shards)
                if done != math.inf:
                    cursor = [epoch, shard, int(done)]
                    break
            position["cursors"][name] = cursor
    return out


def summed(counters: list[dict | None]) -> dict:
    """Counter dicts (ints, and dicts of them such as skips by reason) added key by key."""
    total: dict = {}
    for d in counters:
        for k, v in (d or {}).items():
            total[k] = summed([total.get(k), v]) if isinstance(v, dict) else total.get(k, 0) + int(v)
    return total


def worker_states(states: list[dict]) -> list[dict]:
    """Every old consumer's state (c = rank · workers + worker) from the states of a loader with DataLoader workers,
    which hold `workers` and one entry per worker in `positions`."""
    out = []
    for r, st in enumerate(states):
        positions, workers = st.get("positions"), states[0].get("workers")
        if st.get("workers") != workers or not isinstance(positions, list) or len(positions) != workers:
            raise ValueError(f"data state {r}: expected {workers!r} workers, as rank 0's, each with "
                             f"its entry in 'positions' (has {st.get('workers')!r} workers, "
                             f"{len(positions) if isinstance(positions, list) else 'no'} positions)")
        out += positions
    return out


def check_states(states, fmt: str, what: str, mine: dict, keys: tuple[str, ...]) -> None:
    """Raise ValueError, naming the state and the key, unless `states` are the states of ranks 0..R-1 of one run of
    this loader (format `fmt`; `what` names it with its article), saved with the same `keys` values as `mine` (this
    loader's identity)."""
    if not isinstance(states, list) or not states:
        raise ValueError(f"expected the data states of every rank of the saved run (a non-empty list of {what} "
                         f"states), got {type(states).__name__}")
    for i, st in enumerate(states):
        if not isinstance(st, dict) or st.get("format") != fmt:
            raise ValueError(f"data state {i}: not {what} state (expected format {fmt!r})")
        if st.get("rank") != i or st.get("world_size") != len(states):
            raise ValueError(f"data state {i} is that of rank {st.get('rank')!r} of {st.get('world_size')!r}, but "
                             f"{len(states)} states must be those of ranks 0..{len(states) - 1} of {len(states)} in order")
        for k in keys:
            if st.get(k) != mine[k]:
                raise ValueError(f"data state {i} was saved with different {k} ({st.get(k)!r}, now {mine[k]!r}), so "
                                 "this run can neither continue nor re-split it")

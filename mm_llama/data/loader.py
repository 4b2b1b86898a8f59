"""The text loader the training engine iterates: mixed, packed, sharded over ranks and workers, resumable.

Each (rank, worker) consumer runs its own deterministic stream (text_stream -> mixing -> packing)
and yields whole batches together with its position after them. A DataLoader with workers hands
batches out in strict round-robin over its workers, so the main process keeps, per logical worker,
the position after its latest delivered batch, and which worker delivers next. A resumed
DataLoader always reads physical worker 0 first, so logical ids are rotated to make the worker that
was next be physical worker 0. Batches are then identical to an uninterrupted run.

Resuming with a different number of data-parallel ranks (or workers) cannot continue every stream
exactly, because the shards of an epoch are dealt out by consumer count: `load_state_dicts` deals the
saved positions out again by the rule all loaders share (`resplit`: no sample is skipped). Document
packing restarts at a document boundary, and the counters of all old consumers carry over to the new
first consumer.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..text import ChatFormat
from .accounting import Counters, summarize
from .config import DataConfig
from .mixing import Mixture, mixed_documents, start_position
from .packing import Packer, rows_to_batch
from .resplit import check_states, resplit, summed, worker_states
from .shards import DataError, read_shard, source_shards
from .text_stream import SkipSample, SourceStream, sample_document

STATE_FORMAT = "mm_llama.data.TextLoader/1"


@dataclass
class Batch:
    """One training batch. `tokens`, `labels` (-100 = ignored), `doc_ids`: LongTensor `[batch, seq]`."""

    tokens: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in (self.tokens, self.labels, self.doc_ids)))


@dataclass
class _Plan:
    """Everything a consumer needs; pickled into DataLoader workers."""

    cfg: DataConfig
    tokenizer: object
    urls: dict[str, list[str]]
    seq_len: int
    batch_size: int
    seed: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank: max(1, num_workers)


class DocumentEncoder:
    """A document → ids: a text within begin/end of text; a chat dialog in the chat format (all of it trained on)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chat = tokenizer, ChatFormat(tokenizer)

    def __call__(self, document: str | list) -> list[int]:
        """Raises SkipSample for a dialog the chat format rejects."""
        if isinstance(document, str):
            return self.tokenizer.encode(document, bos=True, eos=True)
        try:
            return self.chat.encode_dialog(document).tokens
        except ValueError as e:
            raise SkipSample(f"not a chat dialog: {e}") from None


def _encoded(documents, encode: DocumentEncoder, counters: Counters, where) -> Iterator[tuple[list[int], object]]:
    """`(ids, position)` of every document that encodes; the others are counted as skipped samples."""
    for document, position in documents:
        try:
            yield encode(document), position
        except SkipSample as e:
            counters.skip("sample", f"{where(position)}: {e}")


def consumer_batches(plan: _Plan, worker: int, state: dict) -> Iterator[tuple]:
    """Endless `(tokens, labels, doc_ids, state after this batch)` of one logical worker of one rank."""
    counters = Counters.from_dict(state.get("stats"))
    consumer, n_consumers = plan.rank * plan.workers + worker, plan.world_size * plan.workers
    streams = [
        SourceStream(s, plan.urls[s.name], consumer, n_consumers, plan.seed, plan.cfg.shuffle, plan.cfg.shuffle_buffer, counters)
        for s in plan.cfg.sources
    ]
    mixture = Mixture([s.weight for s in plan.cfg.sources], plan.seed, consumer)
    packed = state.get("packer")
    position = packed["doc"] if packed else start_position(streams)
    docs = _encoded(mixed_documents(streams, mixture, position), DocumentEncoder(plan.tokenizer), counters,
                    lambda pos: f"document {pos['n']} of the mix")
    packer = Packer(docs, plan.seq_len, offset=packed["offset"] if packed else None)
    counted = 0
    while True:
        rows = [packer.row() for _ in range(plan.batch_size)]
        tokens, labels, doc_ids = rows_to_batch([r[0] for r in rows], [r[1] for r in rows])
        counters.documents += packer.new_documents - counted
        counted = packer.new_documents
        counters.tokens += tokens.numel()
        counters.trained_labels += int((labels != -100).sum())
        doc, offset = packer.state()
        yield tokens, labels, doc_ids, {"packer": {"doc": doc, "offset": offset}, "stats": counters.to_dict()}


class _WorkerStreams(IterableDataset):
    """What each DataLoader worker iterates: its logical worker's stream, rotated by `first`."""

    def __init__(self, plan: _Plan, states: list[dict], first: int):
        self.plan, self.states, self.first = plan, states, first

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % self.plan.workers
        for tokens, labels, doc_ids, state in consumer_batches(self.plan, worker, self.states[worker]):
            yield tokens, labels, doc_ids, worker, state


class TextLoader:
    """Endless packed text batches `[batch_size, seq_len]` for one rank, resumable at any batch.

    Iterate it (one iterator at a time); `state_dict()` is the position after the last batch handed
    out, and `load_state_dict()` before iterating continues right after it. A new `iter()` also
    continues from the current position. Every rank must pass the same `seed`: the shard order
    of an epoch, which the ranks split between them, is drawn from it.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        urls = {s.name: source_shards(s, cfg.root) for s in cfg.sources}
        self._plan = _Plan(cfg, tokenizer, urls, seq_len, batch_size, seed, rank, world_size, max(1, cfg.num_workers))
        self._states: list[dict] = [{} for _ in range(self._plan.workers)]
        self._next = 0

    def __iter__(self) -> Iterator[Batch]:
        plan = self._plan
        if plan.cfg.num_workers == 0:
            for tokens, labels, doc_ids, state in consumer_batches(plan, 0, self._states[0]):
                self._states[0] = state
                yield Batch(tokens, labels, doc_ids)
            return
        dataset = _WorkerStreams(plan, [dict(s) for s in self._states], self._next)
        batches = iter(DataLoader(dataset, batch_size=None, num_workers=plan.workers, in_order=True))
        try:
            for tokens, labels, doc_ids, worker, state in batches:
                self._states[worker] = state
                self._next = (worker + 1) % plan.workers
                yield Batch(tokens, labels, doc_ids)
        finally:
            # Stop the workers now: after an error in a worker the iterator sits in a reference
            # cycle, and DataLoader's shutdown run later by the garbage collector waits 5 s per worker.
            batches._shutdown_workers()

    def _identity(self) -> dict:
        p = self._plan
        return {
            "seed": p.seed,
            "rank": p.rank,
            "world_size": p.world_size,
            "workers": p.workers,  # num_workers 0 and 1 read the same single stream
            "sources": {name: len(urls) for name, urls in p.urls.items()},
        }

    def state_dict(self) -> dict:
        """Plain dicts, lists and numbers (loads with `torch.load(weights_only=True)`).

        `positions[w]` is logical worker w's packer position, `{"doc": {"n": documents drawn,
        "cursors": {source: [epoch, shard, sample]}}, "offset": token offset}`, and its counters;
        `next_worker` is the worker whose batch comes next.
        """
        return {"format": STATE_FORMAT, **self._identity(), "next_worker": self._next, "positions": [dict(s) for s in self._states]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a TextLoader state (expected format {STATE_FORMAT!r})")
        mine = self._identity()
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError("the data loader state was saved under different settings, so it cannot continue exactly: " + "; ".join(diff))
        self._states = [dict(s) for s in state["positions"]]
        self._next = int(state["next_worker"])

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from the states of all ranks of a run (`states[r]` is rank r's `state_dict()`).

        The same number of ranks and workers continues exactly; another number re-splits the positions
        (module docstring).
        """
        p = self._plan
        check_states(states, STATE_FORMAT, "a TextLoader", self._identity(), ("seed", "sources"))
        if len(states) == p.world_size and states[p.rank].get("workers") == p.workers:
            self.load_state_dict(states[p.rank])
            return
        self._states = resplit_positions(states, p)
        self._next = 0

    def stats(self) -> dict:
        """`skipped_samples`, `skipped_shards`, `documents`, `packing_efficiency`, `tokens`, cumulative across resumes."""
        return summarize([Counters.from_dict(s.get("stats")) for s in self._states])


def heldout_batches(cfg: DataConfig, tokenizer, seq_len: int, batch_size: int, max_batches: int) -> list[Batch]:
    """Up to `max_batches` packed batches from `cfg.heldout`: sources, shards and samples in listed order, read once.

    Only full rows are kept; the last batch may have fewer rows.
    """
    counters = Counters()
    encode = DocumentEncoder(tokenizer)

    def documents():
        for source in cfg.heldout:
            for url in source_shards(source, cfg.root):
                for sample in read_shard(url, counters.skip):
                    try:
                        yield encode(sample_document(sample, source)), None
                    except SkipSample as e:
                        counters.skip("sample", f"{url} sample '{sample.get('__key__')}': {e}")

    rows: list[tuple[list[int], list[int]]] = []
    try:
        packer = Packer(documents(), seq_len)
        while len(rows) < max_batches * batch_size:
            rows.append(packer.row())
    except StopIteration:
        pass
    if not rows and cfg.heldout and max_batches > 0:
        names = ", ".join(s.name for s in cfg.heldout)
        raise DataError(
            f"held-out sources {names}: not one row of {seq_len + 1} tokens "
            f"({counters.skipped_shards} shards and {counters.skipped_samples} samples skipped)"
        )
    return [
        Batch(*rows_to_batch([r[0] for r in rows[i : i + batch_size]], [r[1] for r in rows[i : i + batch_size]]))
        for i in range(0, len(rows), batch_size)
    ]


def resplit_positions(states: list[dict], plan: _Plan) -> list[dict]:
    """Per-worker states of rank `plan.rank` of `plan.world_size` from the states of every old rank (module docstring)."""
    old = worker_states(states)
    first = plan.rank * plan.workers
    positions = resplit([w["packer"]["doc"] if w.get("packer") else None for w in old],
                        {name: len(urls) for name, urls in plan.urls.items()}, plan.world_size * plan.workers,
                        range(first, first + plan.workers))
    stats = summed([w.get("stats") for w in old])
    return [{"packer": {"doc": doc, "offset": None}, "stats": stats if first + w == 0 else {}}
            for w, doc in enumerate(positions)]

"""One consumer's endless, replayable walk over one source: epochs -> shards -> samples -> texts.

A consumer is one (rank, worker) pair; there are `world_size x max(1, num_workers)` of them. In
epoch e every consumer computes the same shard permutation, seeded by (seed, source, e), and takes
every n-th shard of it, starting at its own index. When a source has fewer shards than consumers,
every consumer reads every shard and takes every n-th sample instead. Within a shard, samples pass
through a shuffle buffer seeded by (seed, source, e, shard) -- the same for all consumers, so the
sample striding stays disjoint.

A cursor `[epoch, shard, sample]` names the next sample to consider: the `shard`-th entry of this
consumer's list for that epoch, and the `sample`-th sample of that shard in (shuffled) reading
order. WebDataset cannot seek, so resuming re-reads the shard up to `sample`, without decoding.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

from webdataset.filters import shuffle as buffer_shuffle

from ..text.chat_format import ROLES
from .accounting import Counters
from .config import SourceConfig
from .shards import DataError, read_shard

Cursor = list[int]  # [epoch, shard position in this consumer's list, sample index in that shard]


def derive_seed(*parts) -> int:
    """A 64-bit seed from any parts; the same on every machine and Python version (unlike `hash`)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SkipSample(Exception):
    """A sample that carries no usable document; the message says why."""


def sample_text(sample: dict, text_key: str) -> str:
    """The document text of a sample: field `txt`, or a JSON path such as `json.text`."""
    parts = text_key.split(".")
    # the longest leading part that is a member name: a member may itself be called "meta.json"
    for cut in range(len(parts), 0, -1):
        field = ".".join(parts[:cut]).lower()
        if field in sample:
            break
    else:
        raise SkipSample(f"no '{parts[0]}' member (has: {', '.join(k for k in sample if not k.startswith('__'))})")
    try:
        value = sample[field].decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample(f"'{field}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if cut < len(parts):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SkipSample(f"'{field}' is not valid JSON ({e.msg})") from None
        for key in parts[cut:]:
            if not isinstance(value, dict) or key not in value:
                raise SkipSample(f"'{field}' has no field '{'.'.join(parts[cut:])}'")
            value = value[key]
        if not isinstance(value, str):
            raise SkipSample(f"'{text_key}' is {type(value).__name__}, not a string")
    if not value.strip():
        raise SkipSample(f"'{text_key}' is an empty document")
    return value


def sample_messages(sample: dict) -> list:
    """The dialog of a `chat`-format sample: the `messages` list of its `json` member (checked when encoded)."""
    try:
        record = json.loads(sample_text(sample, "json"))
    except json.JSONDecodeError as e:
        raise SkipSample(f"'json' is not valid JSON ({e.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise SkipSample("'json' has no non-empty 'messages' list")
    # the role is checked here too, so that a source of nothing but bad dialogs ends as a barren source
    bad = [i for i, m in enumerate(messages) if not isinstance(m, dict) or m.get("role") not in ROLES]
    if bad:
        raise SkipSample(f"'json' messages[{bad[0]}] is not a message with a role ({', '.join(ROLES)})")
    return messages


def sample_document(sample: dict, source: SourceConfig) -> str | list:
    """A sample's document as its source's `format` says: the text, or the chat messages."""
    return sample_messages(sample) if source.format == "chat" else sample_text(sample, source.text_key)


@dataclass
class SourceStream:
    """The documents one consumer reads from one source."""

    source: SourceConfig
    urls: list[str]
    consumer: int
    n_consumers: int
    seed: int
    shuffle: bool
    buffer: int
    counters: Counters

    def __post_init__(self):
        self._problem = ""  # the latest reason something was skipped, for the all-shards-bad error

    def assignment(self, epoch: int) -> tuple[list[int], bool]:
        """(this consumer's shard indices in reading order for `epoch`, whether samples are strided)."""
        order = list(range(len(self.urls)))
        if self.shuffle:
            random.Random(derive_seed(self.seed, self.source.name, "shards", epoch)).shuffle(order)
        if len(order) >= self.n_consumers:
            return order[self.consumer :: self.n_consumers], False
        return order, True

    def _skip(self, kind: str, message: str) -> None:
        self._problem = message
        self.counters.skip(kind, message)

    def _samples(self, epoch: int, shard: int) -> Iterator[dict]:
        """The shard's samples in (shuffled) reading order; its read errors are counted when it ends.

        The shuffle buffer reads ahead, so an error is met before the samples in front of it are
        used; counting it at the end makes a resumed stream, which re-reads the shard, count it
        exactly when the uninterrupted one does.
        """
        problems: list[tuple[str, str]] = []
        samples = read_shard(self.urls[shard], lambda kind, message: problems.append((kind, message)))
        if self.shuffle and self.buffer > 1:
            seed = derive_seed(self.seed, self.source.name, "samples", epoch, shard)
            samples = buffer_shuffle(self.buffer, initial=self.buffer, seed=seed)(samples)
        yield from samples
        for kind, message in problems:
            self._skip(kind, message)

    kind = "document"  # what one usable sample is called in errors

    def example(self, sample: dict, shard: int, epoch: int):
        """The item one sample gives (a text, or a `chat` source's message list). Raise SkipSample to skip and
        count it; return None to skip a sample that is already counted elsewhere (e.g. by reason)."""
        return sample_document(sample, self.source)

    def documents(self, cursor: Cursor) -> Iterator[tuple[object, Cursor]]:
        """Endless `(item, cursor at this item)`; starts at `cursor`. Subclasses change `example` only."""
        epoch, pos, start = cursor
        barren: set[int] = set()  # shards visited without a usable item since the last one
        while True:
            shards, strided = self.assignment(epoch)
            while pos < len(shards):
                shard = shards[pos]
                found = considered = False
                self._problem = ""
                for index, sample in enumerate(self._samples(epoch, shard)):
                    if index < start or (strided and index % self.n_consumers != self.consumer):
                        continue
                    considered = True
                    try:
                        item = self.example(sample, shard, epoch)
                    except SkipSample as e:
                        self._skip("sample", f"{self.urls[shard]} sample '{sample.get('__key__')}': {e}")
                        continue
                    if item is None:
                        continue
                    found = True
                    barren.clear()
                    yield item, [epoch, pos, index]
                if not found and (considered or start == 0):  # a shard resumed past its end is not barren
                    barren.add(shard)
                    if len(barren) == len(self.urls):
                        problem = self._problem or f"{self.urls[shard]}: no samples for this consumer"
                        raise DataError(
                            f"data source '{self.source.name}': none of its {len(self.urls)} shards gives a usable "
                            f"{self.kind} (consumer {self.consumer} of {self.n_consumers}); last problem: {problem}"
                        )
                pos, start = pos + 1, 0
            epoch, pos = epoch + 1, 0

"""Counts a stream keeps about itself: what it skipped, what it delivered, how well it packed."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

log = logging.getLogger("mm_llama.data")


@dataclass
class Counters:
    """Cumulative per consumer; carried in the loader state so they survive resumes."""

    skipped_samples: int = 0  # undecodable text, missing text field, empty document, repeated member
    skipped_shards: int = 0  # could not be opened, or its tar stream broke part-way
    documents: int = 0  # documents that entered a delivered row
    tokens: int = 0  # input token positions delivered ([B, T] per batch)
    trained_labels: int = 0  # label positions that are not -100

    def skip(self, kind: str, message: str) -> None:
        """Count one skipped `"sample"` or `"shard"` and log why."""
        if kind == "shard":
            self.skipped_shards += 1
        else:
            self.skipped_samples += 1
        log.warning("skipped %s: %s", kind, message)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Counters":
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in (d or {}).items() if k in names})


def summarize(counters: list[Counters]) -> dict:
    """`stats()` of a loader: sums over its consumers plus packing efficiency (trained / label positions)."""
    total = Counters()
    for c in counters:
        for f in fields(Counters):
            setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
    return {
        "skipped_samples": total.skipped_samples,
        "skipped_shards": total.skipped_shards,
        "documents": total.documents,
        "packing_efficiency": total.trained_labels / total.tokens if total.tokens else 0.0,
        "tokens": total.tokens,
    }

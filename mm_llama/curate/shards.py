"""Reading and writing the shards curation streams through.

Text samples: `__key__`, `txt` (UTF-8), optional `json` metadata (`source`, `domain`, `url`, `date`).
Image-text samples: an image member (`jpg`, `jpeg`, `png` or `webp`), `txt` (the caption), optional
`json`. Every other member is passed through unchanged. Outputs are written under a temporary name
and renamed, so a shard on disk is always complete.
"""
from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..config import ConfigError
from ..data.shards import TAR_MTIME

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_GLOB = re.compile(r"[*?\[]")


@dataclass
class Sample:
    """One sample of a shard: its key, decoded text and metadata, and the raw members."""

    key: str
    text: str
    meta: dict
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)


def expand_inputs(specs: list[str]) -> list[Path]:
    """Paths, globs and brace patterns → an ordered, duplicate-free list of existing shard files."""
    paths, missing = [], []
    for spec in specs:
        for item in expand_urls(spec):
            if _GLOB.search(item):
                found = sorted(p for p in glob.glob(os.path.expanduser(item)) if os.path.isfile(p))
                paths.extend(Path(p) for p in found) if found else missing.append(f"{item} (no file matches)")
            elif Path(item).expanduser().is_file():
                paths.append(Path(item).expanduser())
            else:
                missing.append(item)
    if missing:
        raise ConfigError(f"inputs: no such shard: {', '.join(missing)}")
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    names = [p.name for p in unique]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"inputs: shard file names must be unique (outputs keep them), repeated: {', '.join(clashes)}")
    return unique


def read_shard(path: str | Path) -> Iterator[Sample]:
    """Stream the samples of one tar shard in order."""
    path = str(path)
    with open(path, "rb") as f:
        files = ({**item, "__url__": path} for item in tar_file_iterator(f))
        for raw in group_by_keys(files):
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            try:
                text = members["txt"].decode("utf-8") if "txt" in members else ""
                meta = json.loads(members["json"]) if "json" in members else {}
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: sample '{raw['__key__']}': {e}") from e
            if not isinstance(meta, dict):
                raise ValueError(f"{path}: sample '{raw['__key__']}': json member must be an object")
            yield Sample(raw["__key__"], text, meta, members)


class ShardWriter:
    """Writes one output shard atomically (`.tmp` then rename on `close`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._writer = wds.TarWriter(str(self._tmp), mtime=TAR_MTIME)
        self.count = 0

    def write(self, sample: Sample) -> None:
        record = {"__key__": sample.key, **{k: v for k, v in sample.members.items() if k not in ("txt", "json")}}
        record["txt"] = sample.text.encode("utf-8")
        record["json"] = json.dumps(sample.meta, ensure_ascii=False).encode("utf-8")
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        self._writer.close()
        os.replace(self._tmp, self.path)


def write_json(path: str | Path, obj) -> None:
    """Atomic JSON write: a reader never sees half a file, so its presence marks a finished step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True))
    os.replace(tmp, path)

"""`mm-llama data pack text`: a user's own files -> text shards of a target size.

Inputs are folders (searched recursively, sorted), `.txt` / `.md` files (one document each) and
`.jsonl` files (one document per line, the text in a chosen field). Unreadable files and records
without usable text are skipped, counted and named; the rest is written with WebDataset's
`ShardWriter` in the schema of `mm_llama.data.shards`.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from .shards import TAR_MTIME

TEXT_SUFFIXES = {".txt", ".md"}
JSONL_SUFFIXES = {".jsonl"}
META_FIELDS = ("source", "domain", "url", "date", "title", "id")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """`64MB`, `1.5GB`, `512KiB` or a number of bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"shard size {text!r}: expected a positive size such as 64MB, 1GB or 500000")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass
class PackReport:
    documents: int = 0
    skipped_files: int = 0
    skipped_records: int = 0
    bytes: int = 0
    shards: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def skip(self, what: str, message: str) -> None:
        if what == "file":
            self.skipped_files += 1
        else:
            self.skipped_records += 1
        self.problems.append(message)


@dataclass
class MediaPackReport:
    """What a media packer (image, video, speech) wrote and what it skipped, counted by reason."""

    skipped: dict[str, int] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.problems.append(message)

    def skipped_text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.skipped.items()) or "none"


def jsonl_records(path: Path, text: str, required: str) -> list[dict]:
    """Objects of a JSONL listing (blank lines skipped), each with a string field `required` and its line as `_line`;
    a bad line is an error naming the file and the line."""
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get(required), str):
            raise ValueError(f"{path}:{i}: expected an object with a string field '{required}'")
        records.append(record | {"_line": i})
    return records


def input_files(inputs: list[str | Path]) -> list[Path]:
    """The files to pack, in a fixed order; FileNotFoundError / ValueError naming a bad input."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES)
        elif item.is_file():
            if item.suffix.lower() not in TEXT_SUFFIXES | JSONL_SUFFIXES:
                raise ValueError(f"{item}: expected a folder, .txt, .md or .jsonl file")
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def _documents(path: Path, text_field: str, report: PackReport) -> Iterator[tuple[str, dict]]:
    try:
        raw = path.read_bytes()
        content = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        report.skip("file", f"{path}: unreadable ({e})")
        return
    if path.suffix.lower() in TEXT_SUFFIXES:
        if content.strip():
            yield content, {"source": str(path)}
        else:
            report.skip("record", f"{path}: empty document")
        return
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            report.skip("record", f"{path}:{line_no}: not JSON ({e.msg})")
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            report.skip("record", f"{path}:{line_no}: no non-empty string field '{text_field}'")
            continue
        meta = {k: record[k] for k in META_FIELDS if k in record}
        meta.setdefault("source", f"{path}:{line_no}")
        yield text, meta


def pack_text(
    inputs: list[str | Path], out: str | Path, text_field: str = "text", shard_size: int = 64 * 10**6, prefix: str = "train"
) -> PackReport:
    """Write `out/<prefix>-000000.tar, ...`; a shard is closed once it reaches `shard_size` bytes."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_' and '-' only")
    files = input_files(inputs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = PackReport()
    writer = None  # opened at the first document, so no empty shard is written when nothing is usable
    try:
        for path in files:
            for text, meta in _documents(path, text_field, report):
                if writer is None:
                    writer = wds.ShardWriter(
                        str(out / f"{prefix}-%06d.tar"), maxcount=10**12, maxsize=shard_size, verbose=0,
                        post=lambda name: report.shards.append(Path(name)), mtime=TAR_MTIME,
                    )
                writer.write({"__key__": f"{report.documents:012d}", "txt": text, "json": meta})
                report.documents += 1
                report.bytes += len(text.encode("utf-8"))
    finally:
        if writer is not None:
            writer.close()
    return report

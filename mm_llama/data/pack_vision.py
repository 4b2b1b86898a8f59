"""`mm-llama data pack image` / `interleaved`: images (+ captions and questions), or documents with images → shards.

Captions come from a `.tsv` (header row; columns `image`, `caption`, and optionally `question`, `answer`,
`type` for one question per row) or a `.jsonl` (objects with `image`, `caption` and optionally `qa`, a list
of `{"type", "question", "answer"}`), `image` being a path relative to the image folder. Without a caption
file, each image's caption is the text of a sibling file with the same stem and `.txt`.

Every image is fully decoded first (`decode_image`), so a shard never holds one the loader would
skip: unusable ones are skipped and counted by reason (`empty`, `truncated`, `undecodable`,
`too_large`, `missing_image`, `no_caption`, `bad_record`). An image whose extension lies about its
format is stored under the member name of its real format (counted as `renamed`); GIFs are stored as PNG.

`pack interleaved` reads documents with images at their places (`pack_interleaved`): Markdown files, whose
`![alt](path)` links are the images, and JSONL files in OBELICS' layout (one document per line, parallel
`texts` and `images` lists, at each index one of them set: the layout of the public interleaved web corpora
OBELICS and MINT-1T, with local paths where those hold URLs). Images are checked as above.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import webdataset as wds
from PIL import Image

from .image_text import MAX_PIXELS, ImageError, decode_image, sniff_format
from .pack import META_FIELDS, MediaPackReport, jsonl_records
from .shards import TAR_MTIME

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
_MEMBER = {"jpeg": "jpg", "png": "png", "webp": "webp"}


@dataclass
class ImagePackReport(MediaPackReport):
    images: int = 0
    renamed: int = 0


def checked_image(path: Path, report, at: str, max_pixels: int) -> tuple[str, bytes] | None:
    """(member extension, bytes) of an image file the loaders can read, or None: skipped and counted by reason.
    A mislabelled format is stored under its real extension (counted as `renamed`); a GIF becomes PNG."""
    data = path.read_bytes()
    kind = sniff_format(data) if data else None
    try:
        decode_image(data, kind or path.suffix.lstrip("."), max_pixels)
    except ImageError as e:
        report.skip(e.reason, f"{at}: {path}: {e}")
        return None
    if kind == "gif":
        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB").save(buf, format="PNG")
        return "png", buf.getvalue()
    if _MEMBER[kind] != path.suffix.lower().lstrip(".").replace("jpeg", "jpg"):
        report.renamed += 1
    return _MEMBER[kind], data


def read_captions(path: str | Path, item: str = "image") -> list[dict]:
    """Records `{item, "caption"?, "qa"?, "_line"}` of a caption file (module docstring); `item` names the media
    column or field (`image`, or `video` for `pack video`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such caption file")
    text = path.read_text(encoding="utf-8")
    records = []
    if path.suffix.lower() == ".tsv":
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
        columns = set(rows[0]) if rows else set()
        if rows and item not in columns:
            raise ValueError(f"{path}: the header row must name an '{item}' column, got {sorted(columns)}")
        unknown = columns - {item, "caption", "question", "answer", "type"}
        if unknown:
            raise ValueError(f"{path}: unknown columns {sorted(unknown)}; expected {item}, caption, question, answer, type")
        for i, row in enumerate(rows, 2):
            record = {item: row[item], "_line": i}
            if row.get("caption"):
                record["caption"] = row["caption"]
            if row.get("question") and row.get("answer"):
                record["qa"] = [{"type": row.get("type") or "qa", "question": row["question"], "answer": row["answer"]}]
            records.append(record)
        return records
    if path.suffix.lower() == ".jsonl":
        return jsonl_records(path, text, item)
    raise ValueError(f"{path}: expected a .tsv or .jsonl caption file")


def pack_records(captions: str | Path | None, item: str, folder: Path, entries: Callable[[], list[Path]]
                 ) -> tuple[list[dict], str]:
    """(records to pack, where they come from): the captions file's rows, or, without one, one record per
    entry of `folder` (`{item: path relative to the folder}`)."""
    if captions is not None:
        return read_captions(captions, item), str(captions)
    return [{item: str(p.relative_to(folder)), "_line": 0} for p in entries()], str(folder)


def _qa_problem(qa) -> str | None:
    if not isinstance(qa, list):
        return "qa must be a list"
    for item in qa:
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip() for k in ("question", "answer")):
            return "each qa item needs non-empty string 'question' and 'answer'"
    return None


def pack_image(image_dir: str | Path, out: str | Path, captions: str | Path | None = None, *,
               shard_size: int = 256 * 10**6, prefix: str = "train", max_pixels: int = MAX_PIXELS) -> ImagePackReport:
    """Write `out/<prefix>-000000.tar, …` in the image schema (`mm_llama.data.image_text`)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_' and '-' only")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: no such image folder")
    records, where = pack_records(captions, "image", image_dir, lambda: sorted(
        p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = ImagePackReport()
    writer = None  # opened at the first usable image, so nothing usable writes no empty shard
    try:
        for record in records:
            path = image_dir / record["image"]
            at = f"{where}:{record['_line']}" if captions is not None else str(path)
            caption = record.get("caption")
            if captions is None and path.with_suffix(".txt").is_file():
                caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
            qa = record.get("qa")
            if qa is not None and (problem := _qa_problem(qa)):
                report.skip("bad_record", f"{at}: {problem}")
                continue
            if not (isinstance(caption, str) and caption.strip()) and not qa:
                report.skip("no_caption", f"{at}: no caption for {record['image']}")
                continue
            if not path.is_file():
                report.skip("missing_image", f"{at}: no image file {path}")
                continue
            if (checked := checked_image(path, report, at, max_pixels)) is None:
                continue
            member, data = checked
            meta = {"source": record["image"]}
            if isinstance(caption, str) and caption.strip():
                meta["caption"] = caption.strip()
            if qa:
                meta["qa"] = qa
            if writer is None:
                writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=10**12, maxsize=shard_size, verbose=0,
                                         post=lambda name: report.shards.append(Path(name)), mtime=TAR_MTIME)
            sample = {"__key__": f"{report.images:012d}", member: data, "json": meta}
            if "caption" in meta:
                sample["txt"] = meta["caption"]
            writer.write(sample)
            report.images += 1
    finally:
        if writer is not None:
            writer.close()
    return report


# ------------------------------------------------------------------------------ interleaved documents

MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^\"']*[\"'])?\s*\)")
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class InterleavedPackReport(MediaPackReport):
    documents: int = 0
    images: int = 0
    renamed: int = 0


def markdown_segments(path: Path, text: str) -> list[tuple]:
    """A Markdown file → `("text", str)` and `("image", link, line)` in order; `![alt](link)` links are images
    (the alt text is left out; reference-style links and HTML `<img>` stay text)."""
    segments: list[tuple] = []
    at = 0
    for m in MARKDOWN_IMAGE.finditer(text):
        segments += [("text", text[at : m.start()]), ("image", unquote(m.group(1)), text.count("\n", 0, m.start()) + 1)]
        at = m.end()
    return segments + [("text", text[at:])]


def obelics_segments(path: Path, line: int, record: dict) -> list[tuple]:
    """One JSONL record in OBELICS' layout, `{"texts": [str | null, ...], "images": [path | null, ...]}` (at each
    index exactly one is set) → segments as `markdown_segments` gives; ValueError naming `path:line` otherwise."""
    texts, images = record.get("texts"), record.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise ValueError(f"{path}:{line}: expected 'texts' and 'images' lists of equal length (OBELICS layout)")
    segments = []
    for i, (t, im) in enumerate(zip(texts, images)):
        if isinstance(t, str) and im is None:
            segments.append(("text", t))
        elif isinstance(im, str) and im and t is None:
            segments.append(("image", im, line))
        else:
            raise ValueError(f"{path}:{line}: at index {i} exactly one of texts[{i}] (a string) and images[{i}] "
                             f"(a path) must be set, the other null")
    return segments


def interleaved_documents(inputs: list[str | Path]) -> Iterator[tuple[Path, int, list[tuple], dict]]:
    """`(file, line, segments, metadata)` per document of the inputs: folders (searched recursively for `.md` and
    `.jsonl`, sorted), `.md` files (one document each) and `.jsonl` files (one OBELICS record per line)."""
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in (".md", ".jsonl"))
        elif item.is_file() and item.suffix.lower() in (".md", ".jsonl"):
            files = [item]
        elif item.exists():
            raise ValueError(f"{item}: expected a folder, .md or .jsonl file")
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
        for path in files:
            text = path.read_text(encoding="utf-8")
            if path.suffix.lower() == ".md":
                yield path, 1, markdown_segments(path, text), {"source": str(path)}
                continue
            for line, raw in enumerate(text.splitlines(), 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line}: not JSON ({e.msg})") from e
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{line}: expected a JSON object")
                meta = {k: record[k] for k in META_FIELDS if k in record}
                yield path, line, obelics_segments(path, line, record), {"source": f"{path}:{line}"} | meta


def pack_interleaved(inputs: list[str | Path], out: str | Path, *, shard_size: int = 256 * 10**6,
                     prefix: str = "train", max_pixels: int = MAX_PIXELS) -> InterleavedPackReport:
    """Write `out/<prefix>-000000.tar, …` in the interleaved document schema (`mm_llama.data.image_text`).

    Image paths are relative to the file that names them. A path that does not exist, or a remote URL, is an
    error naming the file and line (the input is wrong, not the data). An image file that cannot be used is
    left out and counted by reason (its document keeps its text); a document with no usable image is skipped
    (`no_image`). Text is kept as written (the loader joins parts without adding separators) but for the
document's leading and trailing whitespace; whitespace-only text between images is dropped.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_' and '-' only")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = InterleavedPackReport()
    writer = None
    try:
        for path, line, segments, meta in interleaved_documents(inputs):
            at = f"{path}:{line}"
            content, members = [], {}
            for i, segment in enumerate(segments):
                if segment[0] == "text":
                    text = segment[1].lstrip() if i == 0 else segment[1]
                    text = text.rstrip() if i == len(segments) - 1 else text
                    if text.strip():
                        content.append({"type": "text", "text": text})
                    continue
                link, link_line = segment[1], segment[2]
                if _REMOTE.match(link):
                    raise ValueError(f"{path}:{link_line}: {link} is a remote image; download it and link the local file")
                image = path.parent / link
                if not image.is_file():
                    raise FileNotFoundError(f"{path}:{link_line}: image {link} not found (looked for {image})")
                if (checked := checked_image(image, report, f"{path}:{link_line}", max_pixels)) is None:
                    continue
                member = f"img{len(members)}.{checked[0]}"
                data = checked[1]
                members[member] = data
                content.append({"type": "image", "member": member})
            if not members:
                report.skip("no_image", f"{at}: no usable image in the document")
                continue
            if writer is None:
                writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=10**12, maxsize=shard_size, verbose=0,
                                         post=lambda name: report.shards.append(Path(name)), mtime=TAR_MTIME)
            writer.write({"__key__": f"{report.documents:012d}", "json": {"content": content, **meta}, **members})
            report.documents += 1
            report.images += len(members)
    finally:
        if writer is not None:
            writer.close()
    return report

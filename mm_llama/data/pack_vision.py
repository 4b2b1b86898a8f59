"""`mm-llama data pack image`: a folder of images (+ captions and questions) → image shards.

Captions come from a `.tsv` (header row; columns `image`, `caption`, and optionally `question`, `answer`,
`type` for one question per row) or a `.jsonl` (objects with `image`, `caption` and optionally `qa`, a list
of `{"type", "question", "answer"}`), `image` being a path relative to the image folder. Without a caption
file, each image's caption is the text of a sibling file with the same stem and `.txt`.

Every image is fully decoded first (`decode_image`), so a shard never holds one the loader would
skip: unusable ones are skipped and counted by reason (`empty`, `truncated`, `undecodable`,
`too_large`, `missing_image`, `no_caption`, `bad_record`). An image whose extension lies about its
format is stored under the member name of its real format (counted as `renamed`); GIFs are stored as PNG.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from .image_text import MAX_PIXELS, ImageError, decode_image, sniff_format
from .pack import MediaPackReport, jsonl_records

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
_MEMBER = {"jpeg": "jpg", "png": "png", "webp": "webp"}


@dataclass
class ImagePackReport(MediaPackReport):
    images: int = 0
    renamed: int = 0


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
    if captions is not None:
        records, where = read_captions(captions), str(captions)
    else:
        files = sorted(p for p in image_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        records, where = [{"image": str(p.relative_to(image_dir)), "_line": 0} for p in files], str(image_dir)
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
            data = path.read_bytes()
            kind = sniff_format(data) if data else None
            try:
                decode_image(data, kind or path.suffix.lstrip("."), max_pixels)
            except ImageError as e:
                report.skip(e.reason, f"{at}: {path}: {e}")
                continue
            if kind == "gif":
                buf = io.BytesIO()
                with Image.open(io.BytesIO(data)) as im:
                    im.convert("RGB").save(buf, format="PNG")
                data, kind = buf.getvalue(), "png"
            elif _MEMBER[kind] != path.suffix.lower().lstrip(".").replace("jpeg", "jpg"):
                report.renamed += 1
            meta = {"source": record["image"]}
            if isinstance(caption, str) and caption.strip():
                meta["caption"] = caption.strip()
            if qa:
                meta["qa"] = qa
            if writer is None:
                writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=10**12, maxsize=shard_size, verbose=0,
                                         post=lambda name: report.shards.append(Path(name)))
            sample = {"__key__": f"{report.images:012d}", _MEMBER[kind]: data, "json": meta}
            if "caption" in meta:
                sample["txt"] = meta["caption"]
            writer.write(sample)
            report.images += 1
    finally:
        if writer is not None:
            writer.close()
    return report

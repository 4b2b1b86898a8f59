"""`mm-llama data pack video`: folders of frames or video files (+ captions and questions) → video shards.

Inputs, under one folder (`--videos`): a sub-folder per video holding its frames as image files (time order =
file names in sorted order; `.jpg`, `.jpeg`, `.png`, `.webp`), or video files (`.mp4`, `.mkv`, `.webm`,
`.mov`, `.avi`), which are decoded with PyAV — an optional extra (`pip install av`): without it a video file
is an error that says so, frame folders work without it.

Captions and questions come from a `.tsv` (header row; columns `video`, `caption`, and optionally `question`,
`answer`, `type`) or a `.jsonl` (objects with `video`, `caption` and optionally `qa`, a list of
`{"type", "question", "answer"}`), `video` being a folder or file name relative to `--videos`. Without a
caption file, every entry of `--videos` is packed and its caption is a sibling `<name>.txt`.

At most `max_frames` frames per video are stored, spread uniformly (`mm_llama.data.video.sample_frames`);
frames from a video file are encoded as JPEG; frame images are checked and stored as `pack image` stores
images (`checked_image`: real format's extension, counted as `renamed`; a GIF becomes PNG). Every stored frame
is fully decoded first; unusable frames are skipped and counted by reason
(`empty`, `truncated`, …) and a video with no usable frame as `no_frames`; records as in `pack image`
(`missing_video`, `no_caption`, `bad_record`).
"""
from __future__ import annotations

import importlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from .image_text import MAX_PIXELS
from .pack import MediaPackReport
from .pack_vision import _qa_problem, checked_image, pack_records
from .video import sample_frames
from .shards import TAR_MTIME

FRAME_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".mov", ".avi"}
JPEG_QUALITY = 90
PYAV_MISSING = ("{path}: decoding video files needs PyAV, an optional extra that is not installed "
                "(`pip install av`); or pass a folder of frame images instead")


@dataclass
class VideoPackReport(MediaPackReport):
    videos: int = 0
    frames: int = 0
    renamed: int = 0  # frames stored under their real format's extension


def frame_files(folder: Path) -> list[Path]:
    """The frame images of one video folder, in name order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES)


class MissingExtra(RuntimeError):
    """An input needs an optional package that is not installed; the message names it."""


def import_pyav(path: Path):
    """The `av` module, or `MissingExtra` naming the optional extra."""
    try:
        return importlib.import_module("av")
    except ImportError:
        raise MissingExtra(PYAV_MISSING.format(path=path)) from None


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def video_file_frames(path: Path, max_frames: int) -> list[bytes]:
    """Up to `max_frames` uniformly sampled frames of a video file as JPEG bytes (PyAV)."""
    av = import_pyav(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        total = stream.frames
    if not total:  # the container does not say: count by decoding once
        with av.open(str(path)) as container:
            total = sum(1 for _ in container.decode(video=0))
    wanted = sample_frames(total, max_frames)
    keep, out = set(wanted), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in keep:
                out[i] = _jpeg(frame.to_image())
            if len(out) == len(keep):
                break
    return [out[i] for i in wanted if i in out]


def folder_frames(folder: Path, max_frames: int, report: VideoPackReport, at: str, max_pixels: int
                  ) -> list[tuple[str, bytes]]:
    """(member extension, bytes) of up to `max_frames` usable frames of a frame folder; unusable ones counted."""
    files = frame_files(folder)
    out = []
    for index in sample_frames(len(files), max_frames):
        if (checked := checked_image(files[index], report, at, max_pixels)) is not None:
            out.append(checked)
    return out


def pack_video(video_dir: str | Path, out: str | Path, captions: str | Path | None = None, *, max_frames: int = 64,
               shard_size: int = 256 * 10**6, prefix: str = "train", max_pixels: int = MAX_PIXELS) -> VideoPackReport:
    """Write `out/<prefix>-000000.tar, …` in the video schema (`mm_llama.data.video`)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_' and '-' only")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise FileNotFoundError(f"{video_dir}: no such video folder")
    records, where = pack_records(captions, "video", video_dir, lambda: sorted(
        p for p in video_dir.iterdir() if p.is_dir() or p.suffix.lower() in VIDEO_SUFFIXES))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = VideoPackReport()
    writer = None  # opened at the first usable video, so nothing usable writes no empty shard
    try:
        for record in records:
            path = video_dir / record["video"]
            at = f"{where}:{record['_line']}" if captions is not None else str(path)
            caption = record.get("caption")
            sidecar = path.parent / f"{path.name if path.is_dir() else path.stem}.txt"
            if captions is None and sidecar.is_file():
                caption = sidecar.read_text(encoding="utf-8").strip()
            qa = record.get("qa")
            if qa is not None and (problem := _qa_problem(qa)):
                report.skip("bad_record", f"{at}: {problem}")
                continue
            if not (isinstance(caption, str) and caption.strip()) and not qa:
                report.skip("no_caption", f"{at}: no caption for {record['video']}")
                continue
            if path.is_dir():
                frames = folder_frames(path, max_frames, report, at, max_pixels)
            elif path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
                frames = [("jpg", data) for data in video_file_frames(path, max_frames)]
            elif path.exists():
                report.skip("bad_record", f"{at}: {path} is neither a folder of frames nor a video file "
                                          f"({', '.join(sorted(VIDEO_SUFFIXES))})")
                continue
            else:
                report.skip("missing_video", f"{at}: no video folder or file {path}")
                continue
            if not frames:
                report.skip("no_frames", f"{at}: {path}: no usable frame")
                continue
            meta = {"source": record["video"], "num_frames": len(frames)}
            if isinstance(caption, str) and caption.strip():
                meta["caption"] = caption.strip()
            if qa:
                meta["qa"] = qa
            if writer is None:
                writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=10**12, maxsize=shard_size, verbose=0,
                                         post=lambda name: report.shards.append(Path(name)), mtime=TAR_MTIME)
            sample = {"__key__": f"{report.videos:012d}", "json": meta}
            sample.update({f"{i:03d}.{ext}": data for i, (ext, data) in enumerate(frames)})
            if "caption" in meta:
                sample["txt"] = meta["caption"]
            writer.write(sample)
            report.videos += 1
            report.frames += len(frames)
    finally:
        if writer is not None:
            writer.close()
    return report

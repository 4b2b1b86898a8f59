"""Speech shards: the sample schema, decoding with corrupt-audio accounting, system prompts, packing.

Speech shard schema (WebDataset tar files; members of one sample share the basename `__key__`):

| member         | content                                                                      |
|----------------|------------------------------------------------------------------------------|
| `<key>.flac` or `<key>.wav` | the audio, any sample rate and channel count (resampled to 16 kHz mono) |
| `<key>.json`   | a JSON object (optional for audio-only BEST-RQ data):                          |
|                | `task`: `asr`, `ast` or `dialogue` (absent: audio only)                       |
|                | `transcript`: what is said; `language`: its language, e.g. `English`         |
|                | `translation` + `target_language`: the AST target                              |
|                | `response`: the spoken-dialogue answer                                         |
|                | `duration`, `sample_rate`, `source`: informational                           |

Each task's prompt and target (the paper's system prompts, SPEC §5.5): `asr` → "Repeat after me in
{language}:" and the transcript; `ast` → "Translate the following sentence into {target_language}:" and the
translation; `dialogue` → no system prompt and the response.

Decoding counts every audio it cannot use by reason (`bad_header`, `empty`, `non_finite`, `bad_rate`,
`too_short`, `too_long`, `no_audio`, `bad_metadata`) and what it repaired (`resampled`, `cropped`). Audio
longer than 60 s is randomly cropped to 60 s for pre-training (the paper's BEST-RQ rule) and skipped for the
supervised tasks, whose text would no longer match a crop.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch
import webdataset as wds

from encoders.speech.args import FrontEndArgs
from encoders.speech.features import AudioError, audio_info, decode_audio, min_samples, resample
from .pack import MediaPackReport, jsonl_records
from .shards import TAR_MTIME

log = logging.getLogger("mm_llama.data")

AUDIO_MEMBERS = ("flac", "wav")
AUDIO_SUFFIXES = {".flac", ".wav", ".ogg", ".mp3"}
TASKS = ("asr", "ast", "dialogue")
# Required JSON fields of each task (besides `task`).
TASK_FIELDS = {"asr": ("transcript", "language"), "ast": ("translation", "target_language"), "dialogue": ("response",)}
ASR_PROMPT = "Repeat after me in {language}:"
AST_PROMPT = "Translate the following sentence into {language}:"
# Below 4 kHz (2 kHz bandwidth) a file is not speech audio but a broken header.
MIN_SAMPLE_RATE = 4_000


def system_prompt(task: str, language: str | None) -> str | None:
    """The paper's system prompt for `task` with the *target* language only; None for spoken dialogue."""
    if task == "dialogue":
        return None
    if task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    if not language:
        raise ValueError(f"task {task!r} needs a target language for its system prompt")
    return (ASR_PROMPT if task == "asr" else AST_PROMPT).format(language=language)


def check_metadata(meta: dict) -> str | None:
    """None when `meta` is a usable speech record, else what is wrong with it."""
    task = meta.get("task")
    if task is None:
        return None
    if task not in TASKS:
        return f"task {task!r}: expected one of {', '.join(TASKS)}"
    for name in TASK_FIELDS[task]:
        if not isinstance(meta.get(name), str) or not meta[name].strip():
            return f"task {task!r} needs a non-empty string field '{name}'"
    return None


@dataclass
class SpeechSample:
    """One decoded utterance: wave `[samples]` float32 mono at the front end's rate, plus its metadata."""

    key: str
    wave: torch.Tensor
    meta: dict

    @property
    def task(self) -> str | None:
        return self.meta.get("task")

    @property
    def prompt(self) -> str | None:
        """The system prompt of a supervised sample (None for dialogue and audio-only samples)."""
        if self.task is None:
            return None
        return system_prompt(self.task, self.meta.get("language" if self.task == "asr" else "target_language"))

    @property
    def target(self) -> str | None:
        """The text the LM learns to produce: transcript (ASR), translation (AST) or response (dialogue)."""
        return {"asr": self.meta.get("transcript"), "ast": self.meta.get("translation"),
                "dialogue": self.meta.get("response")}.get(self.task)


@dataclass
class AudioCounters:
    """Per-reason counts; cumulative per consumer and plain ints, so they ride in a loader's resume state."""

    decoded: int = 0
    resampled: int = 0
    cropped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, key: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped audio sample %s (%s): %s", key, reason, message)

    def to_dict(self) -> dict:
        return {"decoded": self.decoded, "resampled": self.resampled, "cropped": self.cropped, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "AudioCounters":
        d = d or {}
        return cls(int(d.get("decoded", 0)), int(d.get("resampled", 0)), int(d.get("cropped", 0)),
                   {k: int(v) for k, v in d.get("skipped", {}).items()})


def _metadata(sample: dict) -> dict:
    raw = sample.get("json")
    if raw is None:
        return {}
    meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    if not isinstance(meta, dict):
        raise ValueError(f"the json member is a {type(meta).__name__}, expected an object")
    return meta


def decode_speech_sample(
    sample: dict,
    args: FrontEndArgs,
    counters: AudioCounters,
    *,
    stack: int = 4,
    crop: bool = False,
    require_task: bool = False,
    generator: torch.Generator | None = None,
) -> SpeechSample | None:
    """A shard sample `{"__key__", "flac" | "wav": bytes, "json": bytes}` → `SpeechSample`, or None (counted).

    `crop` (pre-training): audio over `args.max_seconds` is cropped at a random offset drawn from
    `generator`; otherwise it is skipped as `too_long`. `require_task`: samples without a valid `task`
    record are skipped as `bad_metadata`. Clips too short for one encoder frame of `stack` are `too_short`.
    """
    key = str(sample.get("__key__", "?"))
    if "__url__" in sample:
        key = f"{sample['__url__']}:{key}"
    member = next((m for m in AUDIO_MEMBERS if m in sample), None)
    if member is None:
        counters.skip("no_audio", key, f"no {' or '.join(AUDIO_MEMBERS)} member")
        return None
    try:
        meta = _metadata(sample)
    except ValueError as e:  # json.JSONDecodeError included
        counters.skip("bad_metadata", key, f"json member: {e}")
        return None
    problem = check_metadata(meta) or ("no task" if require_task and "task" not in meta else None)
    if problem:
        counters.skip("bad_metadata", key, problem)
        return None
    data = sample[member]
    try:
        n_samples, rate = audio_info(data)
        if rate < MIN_SAMPLE_RATE:
            raise AudioError("bad_rate", f"sample rate {rate} Hz is below {MIN_SAMPLE_RATE} Hz")
        limit = round(args.max_seconds * rate)
        start = 0
        if n_samples > limit:
            if not crop:
                raise AudioError("too_long", f"{n_samples / rate:.1f} s is longer than {args.max_seconds:g} s")
            start = int(torch.randint(0, n_samples - limit + 1, (), generator=generator))
        wave, rate = decode_audio(data, start, min(n_samples, limit))
        if n_samples > limit:
            counters.cropped += 1
        if rate != args.sample_rate:
            wave = resample(wave, rate, args.sample_rate)
            counters.resampled += 1
        if wave.shape[0] < min_samples(args, stack):
            raise AudioError("too_short", f"{wave.shape[0]} samples at {args.sample_rate} Hz; "
                                          f"need {min_samples(args, stack)} for one encoder frame")
    except AudioError as e:
        counters.skip(e.reason, key, str(e))
        return None
    counters.decoded += 1
    return SpeechSample(key, wave, meta)


def speech_samples(samples: Iterator[dict], args: FrontEndArgs, counters: AudioCounters, **kwargs) -> Iterator[SpeechSample]:
    """Decode a stream of shard samples, dropping (and counting) the unusable ones."""
    for sample in samples:
        decoded = decode_speech_sample(sample, args, counters, **kwargs)
        if decoded is not None:
            yield decoded


# ---------------------------------------------------------------------------------------------------------
# mm-llama data pack speech: a folder of audio files (+ a TSV/JSONL of transcripts) → speech shards


@dataclass
class SpeechPackReport(MediaPackReport):
    utterances: int = 0
    seconds: float = 0.0


RECORD_FIELDS = ("audio", "task", "transcript", "language", "translation", "target_language", "response")


def read_transcripts(path: str | Path) -> list[dict]:
    """Records of a `.tsv` (a header row naming the columns) or `.jsonl` file; each needs `audio`, a path
    relative to the audio folder. Other columns: those of the shard JSON (`task`, `transcript`, …)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such transcript file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".tsv":
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
        if rows and "audio" not in rows[0]:
            raise ValueError(f"{path}: the header row must name an 'audio' column, got {list(rows[0])}")
        unknown = set(rows[0]) - set(RECORD_FIELDS) if rows else set()
        if unknown:
            raise ValueError(f"{path}: unknown columns {sorted(unknown)}; expected some of {', '.join(RECORD_FIELDS)}")
        return [{k: v for k, v in row.items() if v not in (None, "")} | {"_line": i} for i, row in enumerate(rows, 2)]
    if path.suffix.lower() == ".jsonl":
        return jsonl_records(path, text, "audio")
    raise ValueError(f"{path}: expected a .tsv or .jsonl transcript file")


def _audio_bytes(path: Path) -> tuple[bytes, str, int, int]:
    """(bytes to store, member name, samples, rate); FLAC and WAV are stored as they are, other formats
    re-encoded to FLAC. Raises AudioError (the whole file is decoded, so NaN/empty files are caught here)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AudioError("unreadable", f"cannot read ({e})") from e
    wave, rate = decode_audio(data)
    if rate < MIN_SAMPLE_RATE:
        raise AudioError("bad_rate", f"sample rate {rate} Hz is below {MIN_SAMPLE_RATE} Hz")
    member = path.suffix.lower().lstrip(".")
    if member not in AUDIO_MEMBERS:
        buf = io.BytesIO()
        sf.write(buf, wave.numpy(), rate, format="FLAC", subtype="PCM_16")
        data, member = buf.getvalue(), "flac"
    return data, member, wave.shape[0], rate


def pack_speech(
    audio_dir: str | Path,
    out: str | Path,
    transcripts: str | Path | None = None,
    *,
    language: str | None = None,
    task: str | None = None,
    shard_size: int = 256 * 10**6,
    prefix: str = "train",
) -> SpeechPackReport:
    """Write `out/<prefix>-000000.tar, …` in the speech schema.

    With `transcripts` (TSV or JSONL), one sample per record whose `audio` names a file under `audio_dir`;
    `language` and `task` fill records that lack them. Without, every audio file under `audio_dir` becomes
    an audio-only sample (BEST-RQ data). Unreadable audio and bad records are skipped and counted by reason.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix {prefix!r}: use letters, digits, '_' and '-' only")
    if task is not None and task not in TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"{audio_dir}: no such audio folder")
    if transcripts is not None:
        records = read_transcripts(transcripts)
        where = str(transcripts)
    else:
        files = sorted(p for p in audio_dir.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
        records = [{"audio": str(p.relative_to(audio_dir)), "_line": 0} for p in files]
        where = str(audio_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = SpeechPackReport()
    writer = None  # opened at the first usable sample, so nothing usable writes no empty shard
    try:
        for record in records:
            at = f"{where}:{record.pop('_line')}" if transcripts is not None else str(audio_dir / record["audio"])
            meta = {k: record[k] for k in RECORD_FIELDS[1:] if k in record}
            if transcripts is not None:
                meta.setdefault("task", task or "asr")
                if language is not None:
                    meta.setdefault("language", language)
            problem = check_metadata(meta)
            if problem:
                report.skip("bad_metadata", f"{at}: {problem}")
                continue
            path = audio_dir / record["audio"]
            if not path.is_file():
                report.skip("missing_audio", f"{at}: no audio file {path}")
                continue
            try:
                data, member, n, rate = _audio_bytes(path)
            except AudioError as e:
                report.skip(e.reason, f"{at}: {path}: {e}")
                continue
            meta |= {"duration": round(n / rate, 3), "sample_rate": rate, "source": record["audio"]}
            if writer is None:
                writer = wds.ShardWriter(str(out / f"{prefix}-%06d.tar"), maxcount=10**12, maxsize=shard_size, verbose=0,
                                         post=lambda name: report.shards.append(Path(name)), mtime=TAR_MTIME)
            writer.write({"__key__": f"{report.utterances:012d}", member: data, "json": meta})
            report.utterances += 1
            report.seconds += n / rate
    finally:
        if writer is not None:
            writer.close()
    return report

"""Demo speech: spoken commands over a closed vocabulary, for the BEST-RQ and speech-adapter demo stages.

Sentences are drawn from three templates over colours, shapes, numbers and directions ("draw a red
star", "draw four blue circles", "move the green square left"); spoken questions ("what is two plus
three") carry short answers for spoken dialogue; the translation target is Pig Latin, a word-by-word
mapping any reader can check ("draw a red star" -> "awdray away edray arstay").

The audio is real synthesized speech: `espeak-ng` at a few voices and speeds when it is on PATH, else
the committed clips under `demo_assets/speech/clips.tar` (the same keys, written by `build_assets`
with espeak-ng). Clips are 16 kHz mono FLAC with 8-bit samples, peak-normalised and trimmed of
silence, which keeps the committed set near 4 MB; the front end reads them like any other audio.

Held-out split: a fixed set of sentences never spoken in training, each spoken once by a voice never
heard in training and once by a training voice; a few dialogue questions likewise.
"""
from __future__ import annotations

import io
import itertools
import random
import re
import shutil
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

from encoders.speech.features import resample
from .shards import TAR_MTIME

ASSETS = Path(__file__).parent / "demo_assets" / "speech" / "clips.tar"
SAMPLE_RATE = 16_000

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
SHAPES = ("circle", "square", "triangle", "star", "heart")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
DIRECTIONS = ("left", "right", "up", "down")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}

# (espeak-ng voice, words per minute); training voices rotate over the sentences.
TRAIN_VOICES = (("en-us", 150), ("en-gb", 175), ("en-gb-scotland", 160), ("en-029", 170), ("en-us+f3", 155),
                ("en-us", 180), ("en-gb-scotland", 140), ("en-us+f3", 175))
HELDOUT_VOICE = ("en-gb-x-rp", 165)
# 300 training sentences, not 150: with 150 the speech adapter stage recalled training sentences rather than
# hearing words (held-out WER 0.38-0.42 vs 0.30-0.37 with 300, same steps, two seeds; docs/ARCHITECTURE.md)
N_TRAIN_SENTENCES = 300
N_FIRST_TRAIN_SENTENCES = 150
N_HELDOUT_SENTENCES = 20
N_HELDOUT_QUESTIONS = 6
SHARDS_PER_TRAIN_SPLIT = 2
LANGUAGE = "English"
TRANSLATION_LANGUAGE = "Pig Latin"
SEED = 1234
SILENCE = 0.02  # fraction of the peak below which leading / trailing samples are trimmed


def sentences() -> list[str]:
    """Every sentence of the three templates, in a fixed order."""
    out = [f"draw a {c} {s}" for c, s in itertools.product(COLOURS, SHAPES)]
    out += [f"draw {n} {c} {s}s" for n, c, s in itertools.product(NUMBERS[1:9], COLOURS, SHAPES)]
    out += [f"move the {c} {s} {d}" for c, s, d in itertools.product(COLOURS, SHAPES, DIRECTIONS)]
    return out


def questions() -> list[tuple[str, str]]:
    """Spoken-dialogue (question, answer) pairs, in a fixed order."""
    out = [(f"what comes after {NUMBERS[i]}", NUMBERS[i + 1]) for i in range(9)]
    out += [(f"what is {NUMBERS[a]} plus {NUMBERS[b]}", NUMBERS[a + b + 1]) for a in range(5) for b in range(5)]
    out += [(f"what is the opposite of {d}", OPPOSITE[d]) for d in DIRECTIONS]
    out += [("how many sides does a triangle have", "three"), ("how many sides does a square have", "four")]
    return out


def pig_latin(text: str) -> str:
    """Word by word: a leading consonant cluster (with a following `u` after `q`) moves to the end + "ay";
    a word starting with a vowel gets "way"."""
    def word(w: str) -> str:
        m = re.match(r"([^aeiou]*qu|[^aeiou]+)(.*)", w)
        return f"{m.group(2)}{m.group(1)}ay" if m and m.group(2) else f"{w}way"
    return " ".join(word(w) for w in text.split())


@dataclass(frozen=True)
class Clip:
    """One utterance to synthesize: `key` (a tar key), the words, the voice, the speed, its split."""

    key: str
    text: str
    voice: str
    speed: int
    split: str  # "train" or "val"
    kind: str  # "sentence" or "question"


def _key(kind: str, index: int, voice: str, speed: int) -> str:
    return f"{kind}{index:03d}-{re.sub(r'[^A-Za-z0-9]+', '_', voice)}-{speed}"


def clips() -> list[Clip]:
    """The demo's utterances (sentence ids index `sentences()`, question ids `questions()`).

    The first `N_FIRST_TRAIN_SENTENCES` training sentences are drawn together with the held-out ones, the rest
    from the sentences left, by a generator of their own: more training sentences leave the held-out split (and
    every text stage that keeps it out) as it was.
    """
    rng = random.Random(SEED)
    texts = sentences()
    chosen = rng.sample(range(len(texts)), N_FIRST_TRAIN_SENTENCES + N_HELDOUT_SENTENCES)
    heldout = chosen[N_FIRST_TRAIN_SENTENCES:]
    left = sorted(set(range(len(texts))) - set(chosen))
    train = chosen[:N_FIRST_TRAIN_SENTENCES] + random.Random(SEED + 1).sample(
        left, N_TRAIN_SENTENCES - N_FIRST_TRAIN_SENTENCES)
    out = []
    for j, i in enumerate(train):
        voice, speed = TRAIN_VOICES[j % len(TRAIN_VOICES)]
        out.append(Clip(_key("s", i, voice, speed), texts[i], voice, speed, "train", "sentence"))
    for j, i in enumerate(heldout):
        for voice, speed in (HELDOUT_VOICE, TRAIN_VOICES[j % len(TRAIN_VOICES)]):
            out.append(Clip(_key("s", i, voice, speed), texts[i], voice, speed, "val", "sentence"))
    qs = questions()
    heldout_q = set(rng.sample(range(len(qs)), N_HELDOUT_QUESTIONS))
    for i, (q, _) in enumerate(qs):
        voice, speed = HELDOUT_VOICE if i in heldout_q else TRAIN_VOICES[i % len(TRAIN_VOICES)]
        out.append(Clip(_key("q", i, voice, speed), q, voice, speed, "val" if i in heldout_q else "train", "question"))
    return out


def encode_clip(wave: np.ndarray, rate: int) -> bytes:
    """Waveform `[samples]` at `rate` → trimmed, peak-normalised 16 kHz FLAC with 8-bit samples."""
    wave = np.asarray(wave, dtype=np.float32)
    peak = float(np.abs(wave).max()) if wave.size else 0.0
    if peak == 0.0:
        raise ValueError("the synthesized audio is silent")
    loud = np.nonzero(np.abs(wave) > SILENCE * peak)[0]
    pad = rate // 20  # keep 50 ms around the speech
    wave = wave[max(loud[0] - pad, 0): loud[-1] + pad]
    wave = resample(torch.from_numpy(np.ascontiguousarray(wave)), rate, SAMPLE_RATE).numpy()
    wave = 0.9 * wave / np.abs(wave).max()
    buf = io.BytesIO()
    sf.write(buf, wave, SAMPLE_RATE, format="FLAC", subtype="PCM_S8")
    return buf.getvalue()


def synthesize(clip: Clip, espeak: str = "espeak-ng") -> bytes:
    """One clip with espeak-ng (WAV on stdout) → the FLAC bytes of `encode_clip`."""
    try:
        done = subprocess.run([espeak, "-v", clip.voice, "-s", str(clip.speed), "--stdout", clip.text],
                              capture_output=True, check=True, timeout=60)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{espeak} failed on clip {clip.key} (voice {clip.voice}): "
                           f"{e.stderr.decode(errors='replace').strip()}") from e
    wave, rate = sf.read(io.BytesIO(done.stdout), dtype="float32", always_2d=True)
    return encode_clip(wave.mean(axis=1), rate)


def read_assets(path: Path = ASSETS) -> dict[str, bytes]:
    """`{key: flac bytes}` of the committed clips."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the committed demo speech clips are missing (and espeak-ng is not on PATH)")
    out = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".flac"):
                out[member.name[: -len(".flac")]] = tar.extractfile(member).read()
    return out


def audio_for(wanted: list[Clip], source: str = "auto", assets: Path = ASSETS) -> dict[str, bytes]:
    """FLAC bytes per clip key: synthesized (`source="espeak"`, or `auto` with espeak-ng on PATH) or the
    committed clips (`source="assets"`, or `auto` without espeak-ng)."""
    if source not in ("auto", "espeak", "assets"):
        raise ValueError(f"source {source!r}: expected auto, espeak or assets")
    espeak = shutil.which("espeak-ng")
    if source == "espeak" and espeak is None:
        raise FileNotFoundError("espeak-ng is not on PATH (install it, e.g. `apt-get install espeak-ng`)")
    if espeak is not None and source != "assets":
        with ThreadPoolExecutor(4) as pool:  # espeak-ng runs as subprocesses; overlap them
            return dict(zip((c.key for c in wanted), pool.map(lambda c: synthesize(c, espeak), wanted)))
    audio = read_assets(assets)
    missing = [c.key for c in wanted if c.key not in audio]
    if missing:
        raise ValueError(f"{assets}: lacks {len(missing)} demo clips (first: {missing[0]}); rebuild it with "
                         "mm_llama.data.demo_speech.build_assets on a machine with espeak-ng")
    return {c.key: audio[c.key] for c in wanted}


def build_assets(path: Path = ASSETS) -> Path:
    """(Re)write the committed clips with espeak-ng: one tar of `<key>.flac`, fixed order and mtime."""
    audio = audio_for(clips(), source="espeak")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in sorted(audio):
            info = tarfile.TarInfo(f"{key}.flac")
            info.size, info.mtime, info.mode = len(audio[key]), 0, 0o644
            tar.addfile(info, io.BytesIO(audio[key]))
    return path


def records(clip_list: list[Clip]) -> dict[str, list[tuple[Clip, dict]]]:
    """Shard contents per `<task>-<split>`: each clip with its shard JSON (the speech schema of
    `mm_llama.data.speech`)."""
    answers = dict(questions())
    out: dict[str, list[tuple[Clip, dict]]] = {}
    for c in clip_list:
        if c.kind == "sentence":
            out.setdefault(f"asr-{c.split}", []).append(
                (c, {"task": "asr", "transcript": c.text, "language": LANGUAGE, "voice": c.voice, "speed": c.speed}))
            out.setdefault(f"ast-{c.split}", []).append(
                (c, {"task": "ast", "transcript": c.text, "language": LANGUAGE, "translation": pig_latin(c.text),
                     "target_language": TRANSLATION_LANGUAGE, "voice": c.voice, "speed": c.speed}))
        else:
            out.setdefault(f"dialogue-{c.split}", []).append(
                (c, {"task": "dialogue", "transcript": c.text, "language": LANGUAGE, "response": answers[c.text],
                     "voice": c.voice, "speed": c.speed}))
    return out


SPEECH_README = """\
## speech/

Spoken commands over a closed vocabulary (colours, shapes, numbers 1–10, directions), synthesized
{how}, 16 kHz mono FLAC. Shards (speech schema of `mm_llama.data.speech`):

| shards | samples | task |
|---|---|---|
{rows}

`*-val` holds sentences (and questions) never spoken in training, each by a voice never heard in
training ({heldout}) and by a training voice. AST translates into Pig Latin; dialogue answers spoken
questions ("what is two plus three" → "five"). Each sample's `json` also names its `voice` and `speed`.
"""


def write_speech(out: Path, source: str = "auto") -> "DemoPart":
    """The demo speech shards under `out/speech/` (ASR, AST and dialogue, train and val)."""
    from .demo import DemoPart

    clip_list = clips()
    audio = audio_for(clip_list, source)
    folder = out / "speech"
    folder.mkdir(parents=True, exist_ok=True)
    files, counts, rows = [], {}, []
    for name, items in sorted(records(clip_list).items()):
        n_shards = SHARDS_PER_TRAIN_SPLIT if name.endswith("-train") else 1
        for s in range(n_shards):
            files.append(folder / f"{name}-{s:06d}.tar")
            with wds.TarWriter(str(files[-1]), mtime=TAR_MTIME) as sink:
                for clip, meta in items[s::n_shards]:
                    sink.write({"__key__": clip.key, "flac": audio[clip.key],
                                "json": meta | {"sample_rate": SAMPLE_RATE}})
        counts[name] = len(items)
        last = f"{{000000..{n_shards - 1:06d}}}" if n_shards > 1 else "000000"
        rows.append(f"| `speech/{name}-{last}.tar` | {len(items)} | {name.split('-')[0]} |")
    how = "with espeak-ng" if shutil.which("espeak-ng") and source != "assets" else "earlier with espeak-ng (committed clips)"
    readme = SPEECH_README.format(how=how, rows="\n".join(rows), heldout=HELDOUT_VOICE[0])
    return DemoPart("speech", counts, readme, files)

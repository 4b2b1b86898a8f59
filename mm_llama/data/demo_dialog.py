"""Demo post-training data whose better answer is checkable: SFT dialogs, rankings, sampling prompts.

Questions about a scene described in words, so every answer is right or wrong by construction:

| kind       | question                                                | a wrong answer                            |
|------------|---------------------------------------------------------|-------------------------------------------|
| colour     | "I see a blue cup on the table. What colour is the cup?"  | another colour                            |
| shape      | "The page shows a hexagon. How many sides does it have?"   | another number of sides                    |
| count      | "Count the apples: apple pear apple."                    | the count off by one or two               |
| transcript | "Write down what the speaker said: ..."                  | one word swapped for another              |

Rankings are `[chosen, rejected]` (right vs wrong) or, for 30%, `[edited, chosen, rejected]`: the
edited answer states it plainly, the chosen one is right but hedged, the rejected one is wrong.
10% are rated "slightly_better" (two right answers differing in punctuation), which the stages drop
as the paper does. A question lands in the held-out split by a digest of its text, so no held-out
question is seen in training. Every kind is decidable from the question's own text (the answer is in
it, or is a fact the training data states for every shape); arithmetic was dropped because a held-out
sum is a fact training never shows, so no model of the demo could rank it (RM held-out accuracy on
sums was 23–43%, below chance). A colour scene holds one object: with two ("a red ball and a blue
cup", the wrong answer often the other object's colour) the 1.5M-parameter demo models stayed at chance
on colour even on their training pairs (SFT policy 48%, RM 50%, also when told "the cup is blue"), so
binding a colour to one of two objects is beyond the demo's budget and the pairs measured nothing.

40% of SFT dialogs are the speech stage's ASR turn in text ("Repeat after me in English:", the sentence →
the sentence): the copy skill the frozen LM of the speech adapter stage needs.

Media dialogs (the media in the same sample, referenced from the user message; `mm_llama.data.dialog`):
spoken-command dialogs ("What colour did I say?" / "What shape did I say?" about a demo speech clip, the
committed clips: the speech stages' training clips for training, its held-out clips for held-out) and
video dialogs ("Which colour is the moving shape?" / "Which way is the shape moving?" about a demo video
clip, the video stage's training clips and held-out clips with no path shared with them), each as SFT
dialogs and as rankings (right vs wrong answer).
"""
from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path

import webdataset as wds
from .shards import TAR_MTIME

SFT_TRAIN, SFT_VAL = 3000, 200
PREF_TRAIN, PREF_VAL = 3000, 300
PROMPTS = 64
IMAGE_PREF_TRAIN, IMAGE_PREF_VAL = 1200, 200
VIDEO_DIALOG_TRAIN, VIDEO_DIALOG_VAL = 240, 40  # clips; one dialog (and one ranking) per clip
SPEECH_QUESTIONS = {"colour": "What colour did I say?", "shape": "What shape did I say?"}
VIDEO_QUESTIONS = {"colour": "Which colour is the moving shape?", "motion": "Which way is the shape moving?"}
HELDOUT_PERCENT = 10
TRIPLE_SHARE, SLIGHT_SHARE = 0.3, 0.1

OBJECTS = ("ball", "cube", "cup", "hat", "kite", "box", "car", "book", "lamp", "shoe")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple")
SHAPES = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6, "octagon": 8}
THINGS = ("apple", "pear", "plum", "lemon", "egg", "coin", "key", "star")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
WORDS = ("river", "stone", "green", "light", "quiet", "house", "bread", "cloud", "window", "garden", "music",
         "paper", "winter", "silver", "morning", "table", "forest", "letter", "summer", "bridge")
SYSTEM = "You are a careful assistant. Answer in one short sentence."


def _colour(rng: random.Random) -> tuple[str, str, str]:
    thing, (colour, other) = rng.choice(OBJECTS), rng.sample(COLOURS, 2)
    q = f"I see a {colour} {thing} on the table. What colour is the {thing}?"
    return q, f"The {thing} is {colour}.", f"The {thing} is {other}."


def _shape(rng: random.Random) -> tuple[str, str, str]:
    shape = rng.choice(list(SHAPES))
    n = SHAPES[shape]
    wrong = rng.choice([m for m in range(3, 9) if m != n])
    q = f"The page shows a {rng.choice(COLOURS)} {shape}. How many sides does it have?"
    return q, f"It has {NUMBERS[n]} sides.", f"It has {NUMBERS[wrong]} sides."


def _count(rng: random.Random) -> tuple[str, str, str]:
    thing, other = rng.sample(THINGS, 2)
    n = rng.randint(1, 5)
    items = [thing] * n + [other] * rng.randint(0, 3)
    rng.shuffle(items)
    wrong = rng.choice([m for m in (n - 2, n - 1, n + 1, n + 2) if m >= 1])
    q = f"Count the {thing}s: {' '.join(items)}."
    plural = lambda k: thing if k == 1 else f"{thing}s"  # noqa: E731
    return q, f"There are {NUMBERS[n]} {plural(n)}.", f"There are {NUMBERS[wrong]} {plural(wrong)}."


def _transcript(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, 4)
    wrong = list(words)
    wrong[rng.randrange(4)] = rng.choice([w for w in WORDS if w not in words])
    q = f"Write down what the speaker said: {' '.join(words)}."
    return q, f"The speaker said: {' '.join(words)}.", f"The speaker said: {' '.join(wrong)}."


def repeat_dialog(rng: random.Random) -> list[dict]:
    """The speech stage's ASR turn in text: system "Repeat after me in English:", the sentence as the user's
    text → the sentence. Half are demo command sentences never spoken in the held-out speech split, half random
    words, so the LM learns to copy, not to recall."""
    if rng.random() < 0.5:
        sentence = rng.choice(_spoken_training_sentences())
    else:
        sentence = " ".join(rng.sample(WORDS, rng.randint(3, 6)))
    return [{"role": "system", "content": "Repeat after me in English:"},
            {"role": "user", "content": sentence}, {"role": "assistant", "content": sentence}]


def _spoken_training_sentences() -> list[str]:
    from . import demo_speech  # the speech demo's sentence templates and its held-out split

    heldout = {c.text for c in demo_speech.clips() if c.split == "val"}
    return [s for s in demo_speech.sentences() if s not in heldout]


KINDS = {"colour": _colour, "shape": _shape, "count": _count, "transcript": _transcript}
KIND_WEIGHTS = (0.3, 0.15, 0.25, 0.3)
# Of SFT dialogs: the frozen LM of the speech adapter stage (initialised from SFT) must copy text, or the adapter
# has nothing to learn (held-out WER stayed at the blind baseline with an LM that could not copy; 0.49 with 40%).
REPEAT_SHARE = 0.4


def is_heldout_question(question: str) -> bool:
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


def questions(seed: int, heldout: bool) -> "iter[tuple[str, str, str, str]]":
    """Endless `(kind, question, right answer, wrong answer)` of one split, seeded."""
    rng = random.Random(seed)
    while True:
        kind = rng.choices(list(KINDS), KIND_WEIGHTS)[0]
        q, right, wrong = KINDS[kind](rng)
        if is_heldout_question(q) == heldout:
            yield kind, q, right, wrong


def _prompt(rng: random.Random, question: str) -> list[dict]:
    user = {"role": "user", "content": question}
    return [{"role": "system", "content": SYSTEM}, user] if rng.random() < 0.5 else [user]


def sft_records(n: int, seed: int, heldout: bool) -> list[dict]:
    rng, source = random.Random(seed + 1), questions(seed, heldout)
    records = []
    for _ in range(n):
        if rng.random() < REPEAT_SHARE:
            records.append({"messages": repeat_dialog(rng), "kind": "repeat"})
            continue
        kind, q, right, _ = next(source)
        messages = _prompt(rng, q) + [{"role": "assistant", "content": right}]
        if rng.random() < 0.2:  # a second turn
            _, q2, right2, _ = next(source)
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": right2}]
        records.append({"messages": messages, "kind": kind})
    return records


def preference_records(n: int, seed: int, heldout: bool) -> list[dict]:
    rng, source = random.Random(seed + 1), questions(seed, heldout)
    records = []
    for _ in range(n):
        kind, q, right, wrong = next(source)
        u = rng.random()
        if u < SLIGHT_SHARE:
            responses, strength = [right, right[:-1] + "!"], "slightly_better"
        elif u < SLIGHT_SHARE + TRIPLE_SHARE:
            hedged = "I am not sure, but " + right[0].lower() + right[1:]
            responses, strength = [right, hedged, wrong], "significantly_better"
        else:
            responses, strength = [right, wrong], rng.choice(("significantly_better", "better"))
        records.append({"prompt": _prompt(rng, q), "responses": responses, "strength": strength, "kind": kind})
    return records


def prompt_records(n: int, seed: int) -> list[dict]:
    """Held-out questions for rejection sampling, with the right answer kept for checking."""
    rng, source = random.Random(seed + 1), questions(seed, True)
    out = []
    for _ in range(n):
        kind, q, right, _ = next(source)
        out.append({"messages": _prompt(rng, q), "answer": right, "kind": kind})
    return out


def image_preference_samples(n: int, split: str) -> list[dict]:
    """Rankings about a rendered scene (the image demo's scenes, from their own seeds): the image is the
    sample's `jpg` member, referenced from the user message; right vs wrong colour, shape or count."""
    from .demo_vision import ANSWERS, jpeg_bytes, make_scene, questions as scene_questions, render
    from .text_stream import derive_seed

    rng, out = random.Random(derive_seed("demo-image-pref", split)), []
    for i in range(n):
        scene = make_scene(derive_seed("demo-image-pref", split, i))
        qa = rng.choice([q for q in scene_questions(scene) if q["type"] in ("colour", "shape", "count")])
        wrong = rng.choice([a for a in ANSWERS[qa["type"]] if a != qa["answer"]])
        user = {"role": "user",
                "content": [{"type": "image", "member": "jpg"}, {"type": "text", "text": qa["question"]}]}
        record = {"prompt": [user], "responses": [f"{qa['answer'].capitalize()}.", f"{wrong.capitalize()}."],
                  "strength": "significantly_better", "kind": qa["type"]}
        out.append({"__key__": f"imgpref-{split}-{i:06d}", "json": record, "jpg": jpeg_bytes(render(scene))})
    return out


def spoken_answers(sentence: str) -> dict[str, str]:
    """The colour and the shape a demo speech sentence names ("draw four blue circles" → blue, circle)."""
    from .demo_speech import COLOURS as SPOKEN_COLOURS, SHAPES as SPOKEN_SHAPES

    words = sentence.split()
    colour = next(w for w in words if w in SPOKEN_COLOURS)
    shape = next(w.removesuffix("s") for w in words if w.removesuffix("s") in SPOKEN_SHAPES)
    return {"colour": colour, "shape": shape}


def speech_dialog_samples(split: str, rankings: bool = False) -> list[dict]:
    """One sample per demo speech sentence clip of `split` (the committed clips), its audio as the `flac` member:
    an SFT dialog (`rankings=False`) or a ranking, user = [the clip, "What colour/shape did I say?"]; both
    questions alternate over the clips."""
    from .demo_speech import COLOURS as SPOKEN_COLOURS, SHAPES as SPOKEN_SHAPES, clips, read_assets

    audio, out = read_assets(), []
    chosen = [c for c in clips() if c.kind == "sentence" and c.split == split]
    rng = random.Random(f"demo-speech-dialog-{split}-{rankings}")
    for i, clip in enumerate(chosen):
        kind = list(SPEECH_QUESTIONS)[i % 2]
        right = spoken_answers(clip.text)[kind]
        user = {"role": "user", "content": [{"type": "audio", "member": "flac"},
                                            {"type": "text", "text": SPEECH_QUESTIONS[kind]}]}
        if rankings:
            wrong = rng.choice([a for a in (SPOKEN_COLOURS if kind == "colour" else SPOKEN_SHAPES) if a != right])
            record = {"prompt": [user], "responses": [f"{right.capitalize()}.", f"{wrong.capitalize()}."],
                      "strength": "significantly_better", "kind": f"speech_{kind}"}
        else:
            record = {"messages": [user, {"role": "assistant", "content": f"{right.capitalize()}."}],
                      "kind": f"speech_{kind}"}
        out.append({"__key__": f"speech{'pref' if rankings else 'sft'}-{split}-{i:04d}", "json": record,
                    "flac": audio[clip.key]})
    return out


def video_dialog_samples(split: str, rankings: bool = False) -> list[dict]:
    """One sample per demo video clip of `split`, its frames as the members `clip.000.jpg`, …: an SFT dialog or a
    ranking, user = [the clip, "Which colour is the moving shape?" / "Which way is the shape moving?"]."""
    from .demo_video import ANSWERS as VIDEO_ANSWERS

    rng, out = random.Random(f"demo-video-dialog-{split}-{rankings}"), []
    for i, (motion, frames) in enumerate(_video_clips(split)):
        kind = list(VIDEO_QUESTIONS)[i % 2]
        right = motion.colour if kind == "colour" else motion.direction
        user = {"role": "user", "content": [{"type": "video", "member": "clip"},
                                            {"type": "text", "text": VIDEO_QUESTIONS[kind]}]}
        if rankings:
            wrong = rng.choice([a for a in VIDEO_ANSWERS[kind] if a != right])
            record = {"prompt": [user], "responses": [f"{right.capitalize()}.", f"{wrong.capitalize()}."],
                      "strength": "significantly_better", "kind": f"video_{kind}"}
        else:
            record = {"messages": [user, {"role": "assistant", "content": f"{right.capitalize()}."}],
                      "kind": f"video_{kind}"}
        sample = {"__key__": f"video{'pref' if rankings else 'sft'}-{split}-{i:04d}", "json": record}
        sample.update({f"clip.{f:03d}.jpg": frame for f, frame in enumerate(frames)})
        out.append(sample)
    return out


@functools.lru_cache(maxsize=2)
def _video_clips(split: str) -> tuple:
    """The demo video clips of the dialog split with their JPEG frames, rendered once for SFT and rankings."""
    from .demo_video import demo_clips, render_frames
    from .demo_vision import jpeg_bytes

    train, val = demo_clips(VIDEO_DIALOG_TRAIN, VIDEO_DIALOG_VAL)
    return tuple((m, tuple(jpeg_bytes(f) for f in render_frames(m))) for m in (train if split == "train" else val))


def _write(path: Path, prefix: str, records: list[dict]) -> Path:
    return _write_samples(path, [{"__key__": f"{prefix}-{i:06d}", "json": r} for i, r in enumerate(records)])


def _write_samples(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path), mtime=TAR_MTIME) as sink:
        for sample in samples:
            sink.write(sample)
    return path


README = """\
## dialog/

Post-training data with checkable answers (colours, shapes, counts, transcripts described in words);
held-out questions never appear in training.

- `dialog/sft-train-000000.tar` ({sft_train}), `dialog/sft-val-000000.tar` ({sft_val}): SFT dialogs,
  `json` = `{{"messages": [...], "kind": ...}}` (Llama 3 chat messages).
- `dialog/pref-train-000000.tar` ({pref_train}), `dialog/pref-val-000000.tar` ({pref_val}): rankings,
  `json` = `{{"prompt": [...], "responses": [best, ..., worst], "strength": ..., "kind": ...}}`; 2 or 3
  responses (edited > chosen > rejected).
- `dialog/prompts-000000.tar` ({prompts}): held-out prompts for rejection sampling,
  `json` = `{{"messages": [...], "answer": the right reply, "kind": ...}}`.
- `dialog/image-pref-train-000000.tar` ({image_pref_train}), `dialog/image-pref-val-000000.tar`
  ({image_pref_val}): rankings about a rendered scene for the vision RM: `jpg` = the image, `json` =
  a ranking whose user message holds `{{"type": "image", "member": "jpg"}}` and the question (colour,
  shape or count; right vs wrong answer).
- `dialog/speech-sft-{{train,val}}-000000.tar` ({speech_train}, {speech_val}) and `dialog/speech-pref-…`: a demo
  speech clip as `flac` (the speech stages' training clips / held-out clips), the user message
  `[{{"type": "audio", "member": "flac"}}, "What colour did I say?" or "What shape did I say?"]`; SFT dialogs
  answer it ("Blue."), rankings put the right answer above a wrong one.
- `dialog/video-sft-{{train,val}}-000000.tar` ({video_train}, {video_val}) and `dialog/video-pref-…`: a demo video
  clip as the members `clip.000.jpg` … `clip.{last_frame:03d}.jpg`, the user message
  `[{{"type": "video", "member": "clip"}}, "Which colour is the moving shape?" or "Which way is the shape
  moving?"]`; SFT dialogs answer it ("Red.", "Left."), rankings put the right answer above a wrong one.
"""


def write_dialog(out: Path):
    """The demo dialog shards under `out/dialog/` (seconds; deterministic); a `demo.DemoPart`."""
    from .demo import DemoPart  # demo.py lists this writer, so import it here, not at the top

    folder = out / "dialog"
    folder.mkdir(parents=True, exist_ok=True)
    files = [
        _write(folder / "sft-train-000000.tar", "sft", sft_records(SFT_TRAIN, 1, False)),
        _write(folder / "sft-val-000000.tar", "sftval", sft_records(SFT_VAL, 2, True)),
        _write(folder / "pref-train-000000.tar", "pref", preference_records(PREF_TRAIN, 3, False)),
        _write(folder / "pref-val-000000.tar", "prefval", preference_records(PREF_VAL, 4, True)),
        _write(folder / "prompts-000000.tar", "prompt", prompt_records(PROMPTS, 5)),
        _write_samples(folder / "image-pref-train-000000.tar", image_preference_samples(IMAGE_PREF_TRAIN, "train")),
        _write_samples(folder / "image-pref-val-000000.tar", image_preference_samples(IMAGE_PREF_VAL, "val")),
    ]
    counts = {"sft_train": SFT_TRAIN, "sft_val": SFT_VAL, "pref_train": PREF_TRAIN, "pref_val": PREF_VAL,
              "prompts": PROMPTS, "image_pref_train": IMAGE_PREF_TRAIN, "image_pref_val": IMAGE_PREF_VAL}
    for media, make in (("speech", speech_dialog_samples), ("video", video_dialog_samples)):
        for split in ("train", "val"):
            samples = make(split)
            files.append(_write_samples(folder / f"{media}-sft-{split}-000000.tar", samples))
            files.append(_write_samples(folder / f"{media}-pref-{split}-000000.tar", make(split, rankings=True)))
            counts[f"{media}_{split}"] = len(samples)
    from .demo_video import FRAMES

    return DemoPart("dialog", counts, README.format(**counts, last_frame=FRAMES - 1), files)

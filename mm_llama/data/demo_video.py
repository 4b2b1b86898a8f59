"""The demo video data: short rendered clips of one shape moving left, right, up or down.

A clip is `FRAMES` frames of `FRAME_SIZE`² pixels: one shape (circle, square, triangle; the image demo's
colours and drawing) crossing a dark background in a straight line at constant speed. Its caption ("a red
circle moving left") and questions (motion direction, colour, shape) depend only on the pixels; the
direction can only be read from how the frames change. Everything is a pure function of (split, index),
and a held-out clip whose quantised path also occurs in training is dropped (`clip_signature`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .demo_vision import COLOURS, SHAPES, Scene, Shape, jpeg_bytes, render, write_split
from .text_stream import derive_seed

DIRECTIONS = ("left", "right", "up", "down")
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# Answers each question type can have: 1 / len is the chance of a uniform guess.
ANSWERS = {"motion": DIRECTIONS, "colour": tuple(COLOURS), "shape": SHAPES}

FRAMES = 8
FRAME_SIZE = 56  # the tiny video stage's tile: one tile per frame, no resizing in the loader
TRAIN_CLIPS = 1200
VAL_CLIPS = 200
TRAIN_SHARDS = 4


@dataclass(frozen=True)
class Motion:
    kind: str
    colour: str
    direction: str
    start: tuple[float, float]  # centre at the first frame, pixels
    distance: float  # pixels travelled from the first frame to the last
    radius: float
    background: tuple[int, int, int]
    size: int = FRAME_SIZE
    frames: int = FRAMES

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = _STEP[self.direction]
        t = frame / max(self.frames - 1, 1)
        return self.start[0] + dx * self.distance * t, self.start[1] + dy * self.distance * t


def make_motion(seed: int, size: int = FRAME_SIZE, frames: int = FRAMES) -> Motion:
    """A shape that crosses 35–60 % of the frame along one axis, drawn from `random.Random(seed)`."""
    rng = random.Random(seed)
    kind, colour, direction = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(DIRECTIONS)
    radius = rng.uniform(0.12, 0.18) * size
    distance = rng.uniform(0.35, 0.60) * size
    lo, hi = radius + 2, size - radius - 2
    along = rng.uniform(lo, hi - distance)  # where the path starts on the moving axis, leaving room to travel
    across = rng.uniform(lo, hi)
    dx, dy = _STEP[direction]
    if dx:
        start = (along if dx > 0 else size - along, across)
    else:
        start = (across, along if dy > 0 else size - along)
    grey = rng.randint(10, 60)
    return Motion(kind, colour, direction, start, distance, radius, (grey, grey, grey + rng.randint(0, 10)), size, frames)


def render_frames(motion: Motion) -> list[Image.Image]:
    """The clip's frames as RGB PIL images."""
    out = []
    for f in range(motion.frames):
        cx, cy = motion.centre(f)
        shape = Shape(motion.kind, motion.colour, 0, cx, cy, motion.radius)
        out.append(render(Scene((shape,), motion.background, motion.size)))
    return out


def caption(motion: Motion) -> str:
    return f"a {motion.colour} {motion.kind} moving {motion.direction}"


def questions(motion: Motion) -> list[dict]:
    """`[{"type", "question", "answer"}]`: motion direction (twice, in two wordings), colour, shape."""
    return [  # two wordings of the motion question: it is the one only the frames' order answers, so asked most
        {"type": "motion", "question": "Which way is the shape moving?", "answer": motion.direction},
        {"type": "motion", "question": f"In which direction does the {motion.kind} move?", "answer": motion.direction},
        {"type": "colour", "question": "What colour is the moving shape?", "answer": motion.colour},
        {"type": "shape", "question": "What shape is moving?", "answer": motion.kind},
    ]


def clip_signature(motion: Motion) -> tuple:
    """The path rounded to 4-pixel steps: two clips with one signature look alike."""
    return (motion.kind, motion.colour, motion.direction, motion.background, round(motion.start[0] / 4),
            round(motion.start[1] / 4), round(motion.distance / 4), round(motion.radius / 4))


def clip_seed(split: str, index: int) -> int:
    return derive_seed("demo-video", split, index)


def demo_clips(n_train: int = TRAIN_CLIPS, n_val: int = VAL_CLIPS) -> tuple[list[Motion], list[Motion]]:
    """(training clips, held-out clips); no held-out signature occurs in training."""
    train = [make_motion(clip_seed("train", i)) for i in range(n_train)]
    seen = {clip_signature(m) for m in train}
    val, i = [], 0
    while len(val) < n_val:
        motion = make_motion(clip_seed("val", i))
        i += 1
        if clip_signature(motion) not in seen:
            val.append(motion)
    return train, val


def sample_of(key: str, motion: Motion) -> dict:
    """One shard sample in the video schema (`mm_llama.data.video`)."""
    meta = {"caption": caption(motion), "qa": questions(motion), "num_frames": motion.frames, "source": "demo"}
    sample = {"__key__": key, "txt": meta["caption"], "json": meta}
    sample.update({f"{f:03d}.jpg": jpeg_bytes(frame) for f, frame in enumerate(render_frames(motion))})
    return sample


VIDEO_README = """\
## video/

- `video/train-{{000000..{last:06d}}}.tar`: {train} rendered clips of {frames} frames ({size}×{size} JPEG) in {shards} shards.
- `video/val-000000.tar`: {val} held-out clips (other seeds; no path shared with training).

Each sample is one shape (circle, square, triangle; red, green, blue, yellow) moving left, right, up or down
in a straight line:

| member | content |
|---|---|
| `<key>.000.jpg` … `<key>.{last_frame:03d}.jpg` | the frames in time order |
| `<key>.txt` | its caption, e.g. `a red circle moving left` |
| `<key>.json` | `{{"caption": ..., "qa": [{{"type": "motion"/"colour"/"shape", "question": ..., "answer": ...}}], "num_frames": {frames}, "source": "demo"}}` |
"""


def write_video(out: Path, n_train: int = TRAIN_CLIPS, n_val: int = VAL_CLIPS):
    """Video shards for `mm-llama data demo`: clips whose motion direction is the main question (a `DemoPart`)."""
    from .demo import DemoPart  # demo.py imports this module to list it in MODALITIES

    train, val = demo_clips(n_train, n_val)
    files = write_split(out / "video", train, val, TRAIN_SHARDS, sample_of)
    counts = {"train_clips": len(train), "val_clips": len(val), "train_shards": TRAIN_SHARDS, "frames_per_clip": FRAMES}
    readme = VIDEO_README.format(last=TRAIN_SHARDS - 1, train=len(train), frames=FRAMES, size=FRAME_SIZE,
                                 shards=TRAIN_SHARDS, val=len(val), last_frame=FRAMES - 1)
    return DemoPart("video", counts, readme, files)

"""The demo image data: procedurally rendered scenes whose captions and answers depend on the pixels.

A scene holds 1–4 copies of one shape (circle, square, triangle) in one colour (red, green, blue,
yellow), each in a different quadrant of the image, on a dark background. From it come a caption
("a red circle in the top left", "three blue squares") and questions about colour, shape, count and,
for a single shape, its position. Everything is a pure function of (split, index): a scene is drawn
from its own `random.Random` seeded by a digest of both, so any image can be rebuilt alone.

The held-out split is disjoint from training: its scenes come from other seeds, and a held-out scene
whose quantised layout also occurs in training is dropped (`scene_signature`).

Beside the pairs, a small set of interleaved documents (`image/documents-*.tar`, the interleaved schema of
`mm_llama.data.image_text`): each shows 2–3 training scenes, every picture followed by its caption
("Picture 1 of 2: <image> A red circle in the top left. Picture 2 of 2: <image> Three blue squares."),
so the text that describes a picture comes after its image token and can see it.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

from .text_stream import derive_seed
from .shards import TAR_MTIME

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
COUNT_WORDS = ("one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "position")
# Answers each question type can have: 1 / len is the chance of a uniform guess.
ANSWERS = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNT_WORDS, "position": QUADRANTS}

IMAGE_SIZE = 84  # pixels per side; the tiny stages tile at 56 (downscaled) and anneal at 84
TRAIN_IMAGES = 4000
VAL_IMAGES = 400
TRAIN_SHARDS = 8  # enough for 2 ranks x 2 workers to each own shards
DOCUMENT_SHARDS = 4
DOCUMENTS_PER_IMAGE = 0.1  # interleaved documents per training image (400 for the 4000 images)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    quadrant: int  # index into QUADRANTS
    cx: float  # centre, pixels
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    size: int

    @property
    def colour(self) -> str:
        return self.shapes[0].colour

    @property
    def kind(self) -> str:
        return self.shapes[0].kind


def make_scene(seed: int, size: int = IMAGE_SIZE) -> Scene:
    """1–4 shapes of one kind and colour in distinct quadrants, drawn from `random.Random(seed)`."""
    rng = random.Random(seed)
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    count = rng.randint(1, 4)
    half = size / 2
    shapes = []
    for q in sorted(rng.sample(range(4), count)):
        radius = rng.uniform(0.20, 0.30) * half
        # keep the whole shape inside its quadrant, away from the centre lines
        lo, hi = radius + 0.06 * half, half - radius - 0.06 * half
        cx = (q % 2) * half + rng.uniform(lo, hi)
        cy = (q // 2) * half + rng.uniform(lo, hi)
        shapes.append(Shape(kind, colour, q, cx, cy, radius))
    grey = rng.randint(10, 60)
    return Scene(tuple(shapes), (grey, grey, grey + rng.randint(0, 10)), size)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB PIL image `size × size`."""
    image = Image.new("RGB", (scene.size, scene.size), scene.background)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = COLOURS[s.colour]
        box = (s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            r = s.radius * 0.85  # a square of the circle's area looks the same size
            draw.rectangle((s.cx - r, s.cy - r, s.cx + r, s.cy + r), fill=fill)
        else:
            pts = [(s.cx + s.radius * math.sin(a), s.cy - s.radius * math.cos(a))
                   for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
            draw.polygon(pts, fill=fill)
    return image


def caption(scene: Scene) -> str:
    n = len(scene.shapes)
    if n == 1:
        return f"a {scene.colour} {scene.kind} in the {QUADRANTS[scene.shapes[0].quadrant]}"
    return f"{COUNT_WORDS[n - 1]} {scene.colour} {scene.kind}s"


def questions(scene: Scene) -> list[dict]:
    """`[{"type", "question", "answer"}]`: colour, shape, count, and position when there is one shape."""
    n = len(scene.shapes)
    noun = "shape is" if n == 1 else "shapes are"
    qa = [
        {"type": "colour", "question": f"What colour {'is the shape' if n == 1 else 'are the shapes'}?", "answer": scene.colour},
        {"type": "shape", "question": f"What {noun} in the image?", "answer": scene.kind},
        {"type": "count", "question": "How many shapes are there?", "answer": COUNT_WORDS[n - 1]},
    ]
    if n == 1:
        qa.append({"type": "position", "question": "Where is the shape?", "answer": QUADRANTS[scene.shapes[0].quadrant]})
    return qa


def draw_question(rng: random.Random) -> tuple[Scene, dict]:
    """A scene and one of its questions, every question type equally often. A position question needs a scene of
    one shape (a quarter of them): scenes are drawn from `rng` until one offers the type."""
    kind = rng.choice(QUESTION_TYPES)
    while True:
        scene = make_scene(rng.getrandbits(64))
        found = [q for q in questions(scene) if q["type"] == kind]
        if found:
            return scene, found[0]


def scene_signature(scene: Scene) -> tuple:
    """The layout rounded to 4-pixel steps: two scenes with one signature look alike."""
    return (scene.background,) + tuple((s.kind, s.colour, s.quadrant, round(s.cx / 4), round(s.cy / 4), round(s.radius / 4))
                                       for s in scene.shapes)


def scene_seed(split: str, index: int) -> int:
    return derive_seed("demo-image", split, index)


def jpeg_bytes(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def demo_scenes(n_train: int = TRAIN_IMAGES, n_val: int = VAL_IMAGES, size: int = IMAGE_SIZE
                ) -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes); no held-out signature occurs in training."""
    train = [make_scene(scene_seed("train", i), size) for i in range(n_train)]
    seen = {scene_signature(s) for s in train}
    val, i = [], 0
    while len(val) < n_val:
        scene = make_scene(scene_seed("val", i), size)
        i += 1
        if scene_signature(scene) not in seen:
            val.append(scene)
    return train, val


def sample_of(key: str, scene: Scene) -> dict:
    """One shard sample in the image schema (`mm_llama.data.image_text`)."""
    meta = {"caption": caption(scene), "qa": questions(scene), "source": "demo"}
    return {"__key__": key, "jpg": jpeg_bytes(render(scene)), "txt": meta["caption"], "json": meta}


def document_of(key: str, scenes: list[Scene]) -> dict:
    """One shard sample in the interleaved document schema: "Picture i of n: <image> Caption." per scene."""
    content, members = [], {}
    for i, scene in enumerate(scenes):
        member = f"img{i}.jpg"
        end = "" if i == len(scenes) - 1 else " "
        content += [{"type": "text", "text": f"Picture {i + 1} of {len(scenes)}: "}, {"type": "image", "member": member},
                    {"type": "text", "text": f" {caption(scene).capitalize()}.{end}"}]
        members[member] = jpeg_bytes(render(scene))
    return {"__key__": key, "json": {"content": content, "source": "demo"}, **members}


def write_documents(folder: Path, train: list[Scene], n_documents: int, shards: int = DOCUMENT_SHARDS) -> list[Path]:
    """`documents-NNNNNN.tar`: `n_documents` documents of 2–3 training scenes each (drawn per document)."""
    files = []
    for shard in range(shards):
        files.append(folder / f"documents-{shard:06d}.tar")
        with wds.TarWriter(str(files[-1]), mtime=TAR_MTIME) as sink:
            for d in range(shard, n_documents, shards):
                rng = random.Random(derive_seed("demo-document", d))
                sink.write(document_of(f"doc{d:07d}", rng.sample(train, rng.randint(2, 3))))
    return files


IMAGE_README = """\
## image/

- `image/train-{{000000..{last:06d}}}.tar`: {train} rendered images ({size}×{size} JPEG) in {shards} shards.
- `image/val-000000.tar`: {val} held-out images (other seeds; no layout shared with training).
- `image/documents-{{000000..{doc_last:06d}}}.tar`: {documents} interleaved documents of 2–3 training images,
  `json` {{"content": [{{"type": "text", "text": "Picture 1 of 2: "}}, {{"type": "image", "member": "img0.jpg"}},
  {{"type": "text", "text": " A red circle in the top left. "}}, ...]}} with members `<key>.img0.jpg`, `<key>.img1.jpg`, ...
  (the `vision_lm` stage reads them when `train.options.documents` names their source).

Each sample is one scene of 1–4 shapes (circle, square, triangle) of one colour (red, green, blue,
yellow), each in its own quadrant:

| member | content |
|---|---|
| `<key>.jpg` | the image |
| `<key>.txt` | its caption, e.g. `a red circle in the top left`, `three blue squares` |
| `<key>.json` | `{{"caption": ..., "qa": [{{"type": "colour"/"shape"/"count"/"position", "question": ..., "answer": ...}}], "source": "demo"}}` |
"""


def write_split(folder: Path, train: list, val: list, train_shards: int, sample_of) -> list[Path]:
    """`train-NNNNNN.tar` (items dealt round-robin over `train_shards`) and `val-000000.tar` under `folder`;
    `sample_of(key, item)` makes each sample. Returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for shard in range(train_shards):
        files.append(folder / f"train-{shard:06d}.tar")
        with wds.TarWriter(str(files[-1]), mtime=TAR_MTIME) as sink:  # fixed mtime: identical bytes on every run
            for i in range(shard, len(train), train_shards):
                sink.write(sample_of(f"train{i:07d}", train[i]))
    files.append(folder / "val-000000.tar")
    with wds.TarWriter(str(files[-1]), mtime=TAR_MTIME) as sink:
        for i, item in enumerate(val):
            sink.write(sample_of(f"val{i:07d}", item))
    return files


def write_image(out: Path, n_train: int = TRAIN_IMAGES, n_val: int = VAL_IMAGES, n_documents: int | None = None):
    """Image shards for `mm-llama data demo`: captions and pixel-grounded questions, and interleaved documents
    (`n_documents`, default one per ten training images); a `DemoPart`."""
    from .demo import DemoPart  # demo.py imports this module to list it in MODALITIES

    train, val = demo_scenes(n_train, n_val)
    n_documents = round(n_train * DOCUMENTS_PER_IMAGE) if n_documents is None else n_documents
    files = write_split(out / "image", train, val, TRAIN_SHARDS, sample_of)
    files += write_documents(out / "image", train, n_documents)
    counts = {"train_images": len(train), "val_images": len(val), "train_shards": TRAIN_SHARDS,
              "train_documents": n_documents}
    readme = IMAGE_README.format(last=TRAIN_SHARDS - 1, train=len(train), shards=TRAIN_SHARDS, val=len(val), size=IMAGE_SIZE,
                                 doc_last=DOCUMENT_SHARDS - 1, documents=n_documents)
    return DemoPart("image", counts, readme, files)

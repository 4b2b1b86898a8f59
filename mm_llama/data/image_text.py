"""Image shards: the sample schemas, decoding with corrupt-image accounting, and the resumable image loader.

Image-text pair / image QA shard schema (WebDataset tar files; members of one sample share `__key__`):

| member                       | content                                                              |
|------------------------------|----------------------------------------------------------------------|
| `<key>.jpg` / `.jpeg` / `.png` / `.webp` | the image, any size (tiled to at most `max_tiles` tiles)  |
| `<key>.txt`                  | the caption (image-text pairs; CLIP and caption targets)             |
| `<key>.json`                 | optional object: `caption` (overrides `.txt`), `qa`: a list of `{"type", "question", "answer"}` (image QA; `type` is free text such as `colour`), `source`, `url`, ... |

Interleaved image-text document schema (one sample = one document whose text holds its images at their places):

| member                       | content                                                              |
|------------------------------|----------------------------------------------------------------------|
| `<key>.json`                 | `{"content": [part, ...], "source": ..., ...}`; a part is `{"type": "text", "text": "..."}` or `{"type": "image", "member": "img0.jpg"}`, in reading order |
| `<key>.img0.jpg`, `<key>.img1.png`, ... | the images the parts name (`img<i>.<jpg/jpeg/png/webp>`, numbered from 0 in order) |

The parts are the chat format's content parts, and an image part names its member as in the dialog
shards (`mm_llama.data.dialog`), so a document reads like the content of one message. Members are
`img<i>.<ext>` rather than `<i>.<ext>`: the sample has no plain `jpg` member, so a pair loader pointed at
document shards counts `no_image` instead of training on the first picture as a caption pair. A document
becomes `[bos] text <|image|> text <|image|> ... [eos]` (`encode_document`: text parts as written, no
separator added), one `<|image|>` per image at its place; each image is seen by the text from its token
to the next image token (Meta's cross-attention mask, `adapters.cross_attention.image_spans`). At most
`max_images` images are kept: the document is cut just before the next one (counted `truncated`), since
a cut keeps the text about the images it keeps, where skipping the document would lose it all. A
document longer than the sequence is cut there too, with the images past the cut. An image part whose
member is missing or unusable is dropped and counted by reason (the text stays); a document left with no
image is skipped. Video-text samples hold `<key>.jpgs.npz` (packed JPEG frames: `data`, `offsets`) and a
`<key>.json` with `fps`, `num_frames`, `caption` and optional `qa` (`mm_llama.data.video`).

Decoding (`decode_image`) sniffs the format from the bytes, decodes JPEG with
`torchvision.io.decode_jpeg` and PNG/WebP/GIF with `decode_image`, and falls back to PIL for what
those reject but PIL reads (CMYK JPEGs, 16-bit PNGs). Unusable images are skipped and counted by
reason: `empty`, `truncated`, `wrong_extension` (content is another format than the member says),
`too_large` (more than `max_pixels`, checked from the header before decoding: decompression bombs),
`undecodable`, `no_image` (no image member), `no_text` (no caption or question for the task).

Workers tile in uint8 when asked (`uint8=True`: `tile_image_uint8`'s tiles, a quarter of the bytes through shared
memory), resizing each image when it is decoded and cutting its tiles straight into the batch (`Tiled.resized`,
`collate_images`); `model_images` normalises such a batch where it is used, to exactly the floats `tile_image` gives.

`ImageLoader` streams examples like `TextLoader`: one deterministic, replayable stream per
(rank, worker) consumer (`SourceStream`'s epoch → shard → sample walk and `Mixture`'s weighted
draw), decoding and tiling inside the DataLoader workers, batches handed out round-robin, and the
position of every logical worker kept in the main process, so `state_dict()` resumes exactly; another
number of ranks or workers re-splits the positions (`load_state_dicts`, the rule all loaders share in `resplit`).
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image as tv_decode_image, decode_jpeg

from encoders.vision.transform import cut_tiles, normalize_images, resize_to_canvas, tile_image

from .accounting import Counters
from .batch_buffers import BufferPool, keep_freed_memory, shared_storage, take_lent
from .config import DataConfig
from .mixing import Mixture, mixed_documents, start_position
from .resplit import check_states, resplit, summed, worker_states
from .shards import read_shard, source_shards
from .text_stream import SkipSample, SourceStream, derive_seed

log = logging.getLogger("mm_llama.data")

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
MAX_PIXELS = 64 * 2**20  # 64 megapixels: beyond this an image is a decompression bomb, not training data
STATE_FORMAT = "mm_llama.data.ImageLoader/1"
PREFETCH = 2  # batches each DataLoader worker keeps ready (DataLoader's default prefetch_factor)


class ImageError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """'jpeg', 'png', 'webp', 'gif' from the magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


_EXTENSION_FORMAT = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp", "gif": "gif"}


def decode_image(data: bytes, extension: str, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """Image bytes stored under `<key>.<extension>` → uint8 `[3, height, width]` RGB; ImageError(reason) if unusable."""
    if not data:
        raise ImageError("empty", "empty file")
    kind = sniff_format(data)
    if kind is None:
        raise ImageError("undecodable", f"not a JPEG, PNG, WebP or GIF (starts with {data[:8]!r})")
    expected = _EXTENSION_FORMAT.get(extension.lower())
    if expected != kind:
        raise ImageError("wrong_extension", f"a {kind.upper()} stored as .{extension}")
    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("truncated" if "runcat" in str(e) else "undecodable", f"unreadable header: {e}") from None
    if width * height > max_pixels:
        raise ImageError("too_large", f"{width}x{height} is more than {max_pixels} pixels")
    if kind == "jpeg" and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ImageError("truncated", "the JPEG has no end-of-image marker")
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        if kind == "jpeg":
            return decode_jpeg(raw, mode=ImageReadMode.RGB)
        return tv_decode_image(raw, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        first = e
    try:  # torchvision rejects some valid files (CMYK JPEG, 16-bit PNG) that PIL reads
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                rgb = im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken data
        reason = "truncated" if "runcat" in f"{first} {e}" else "undecodable"
        raise ImageError(reason, f"{first}; PIL: {e}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


@dataclass
class ImageCounters:
    """Decoded images and skips by reason; plain ints, so they ride in the loader state across resumes."""

    decoded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0  # interleaved documents cut at `max_images` images

    def skip(self, reason: str, where: str, message: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("skipped image %s (%s): %s", where, reason, message)

    def to_dict(self) -> dict:
        return {"decoded": self.decoded, "skipped": dict(self.skipped), "truncated": self.truncated}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ImageCounters":
        d = d or {}
        return cls(int(d.get("decoded", 0)), {k: int(v) for k, v in d.get("skipped", {}).items()},
                   int(d.get("truncated", 0)))


def sample_metadata(sample: dict) -> dict:
    """The `json` member as a dict ({} when absent); SkipSample when it is not a JSON object."""
    raw = sample.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipSample(f"json member is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise SkipSample(f"json member is a {type(meta).__name__}, expected an object")
    return meta


def sample_caption(sample: dict, meta: dict) -> str | None:
    text = meta.get("caption")
    if not isinstance(text, str) and "txt" in sample:
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return text.strip() if isinstance(text, str) and text.strip() else None


class Tiled:
    """One decoded image cut into tiles: `tiles` `[rows·cols, 3, tile, tile]` (float normalised, or uint8), and
    `grid` (rows, cols).

    `Tiled.resized(image, grid, tile_size)` holds the uint8 image resized onto its canvas (`resize_to_canvas`)
    instead: `collate_images` cuts it straight into the batch's tile slots (`cut_into`), each pixel copied once
    where cutting first and stacking after copied it twice more; `tiles` cuts it on first use.
    """

    def __init__(self, tiles: torch.Tensor, grid: tuple[int, int]):
        if tiles.ndim != 4 or tiles.shape[0] != grid[0] * grid[1]:
            raise ValueError(f"tiles {list(tiles.shape)} for a {grid[0]}x{grid[1]} grid: "
                             f"expected [{grid[0] * grid[1]}, 3, tile, tile]")
        self._tiles, self._resized, self.grid, self.tile_size = tiles, None, tuple(grid), tiles.shape[-1]

    @classmethod
    def resized(cls, image: torch.Tensor, grid: tuple[int, int], tile_size: int) -> "Tiled":
        tiled = cls.__new__(cls)
        tiled._tiles, tiled._resized, tiled.grid, tiled.tile_size = None, image, tuple(grid), tile_size
        return tiled

    @property
    def tiles(self) -> torch.Tensor:
        if self._tiles is None:
            self._tiles = cut_tiles(self._resized, self.grid, self.tile_size)
        return self._tiles

    @property
    def dtype(self) -> torch.dtype:
        return (self._resized if self._tiles is None else self._tiles).dtype

    def cut_into(self, slots: torch.Tensor) -> None:
        """Write the tiles into `slots[:rows·cols]` (`slots` `[≥ rows·cols, 3, tile, tile]`: its place in a batch)."""
        if self._tiles is None:
            cut_tiles(self._resized, self.grid, self.tile_size, out=slots)
        else:
            slots[: self._tiles.shape[0]] = self._tiles

    def __repr__(self) -> str:
        form = "tiles" if self._tiles is not None else "resized"
        shape = list((self._resized if self._tiles is None else self._tiles).shape)
        return f"Tiled(grid={self.grid}, {form} {shape} {self.dtype})"


class ImageDecoder:
    """A shard sample → `Tiled` image (or None after counting why); runs inside the loader's workers.
    `uint8`: the image resized for tiles before normalisation (`Tiled.resized`, cut by `collate_images` into the
    batch: `tile_image_uint8`'s tiles), for `model_images` to finish."""

    def __init__(self, tile_size: int, max_tiles: int, max_pixels: int = MAX_PIXELS, uint8: bool = False):
        self.tile_size, self.max_tiles, self.max_pixels, self.uint8 = tile_size, max_tiles, max_pixels, uint8

    def tile(self, data: bytes, extension: str, where: str, counters: ImageCounters) -> Tiled | None:
        """One image member's bytes → `Tiled`, or None after counting why it is unusable."""
        try:
            pixels = decode_image(data, extension, self.max_pixels)
        except ImageError as e:
            counters.skip(e.reason, where, str(e))
            return None
        counters.decoded += 1
        if self.uint8:
            return Tiled.resized(*resize_to_canvas(pixels, self.tile_size, self.max_tiles), self.tile_size)
        return Tiled(*tile_image(pixels, self.tile_size, self.max_tiles))

    def __call__(self, sample: dict, counters: ImageCounters) -> Tiled | None:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        member = next((m for m in IMAGE_MEMBERS if m in sample), None)
        if member is None:
            counters.skip("no_image", where, f"no {'/'.join(IMAGE_MEMBERS)} member")
            return None
        return self.tile(sample[member], member, where, counters)


def model_images(images: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
    """A batch's images as the model takes them: float images as they are, uint8 ones (`uint8=True` loaders)
    normalised, with the same bits as if the workers had normalised them. Call it on the device."""
    return normalize_images(images, aspect_ratios) if images.dtype == torch.uint8 else images


# ------------------------------------------------------------------------------ interleaved documents

@dataclass
class Document:
    """An interleaved document: its text parts (str) and images (`Tiled`) in reading order."""

    parts: list[str | Tiled]

    @property
    def images(self) -> list[Tiled]:
        return [p for p in self.parts if isinstance(p, Tiled)]


def document_parts(sample: dict) -> list[dict]:
    """The `content` parts of a document sample's `json` member; SkipSample when they are not a list of parts."""
    content = sample_metadata(sample).get("content")
    if not isinstance(content, list) or not content:
        raise SkipSample("json member has no non-empty 'content' list (interleaved document schema)")
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind == "image" and isinstance(part.get("member"), str):
            continue
        raise SkipSample(f"content[{i}] is not a text part {{type: text, text}} or an image part {{type: image, member}}")
    return content


class DocumentDecoder:
    """A document sample → `Document` with at most `max_images` decoded images (or None after counting why).

    Runs in the loader's workers. Unusable or missing image members are dropped and counted by reason; at the
    image after the `max_images`-th the document is cut (counted in `truncated`).
    """

    def __init__(self, images: ImageDecoder, max_images: int):
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.images, self.max_images = images, max_images

    def __call__(self, sample: dict, counters: ImageCounters) -> Document | None:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        parts: list[str | Tiled] = []
        n_images = 0
        content = document_parts(sample)
        for part in content:
            if part["type"] == "text":
                if part["text"]:
                    parts.append(part["text"])
                continue
            if n_images == self.max_images:
                counters.truncated += 1
                break
            member = part["member"]
            if member not in sample:
                counters.skip("no_image", f"{where}:{member}", "the content names a member the sample lacks")
                continue
            tiled = self.images.tile(sample[member], member.rsplit(".", 1)[-1], f"{where}:{member}", counters)
            if tiled is not None:
                parts.append(tiled)
                n_images += 1
        if n_images == 0:
            if not any(p["type"] == "image" for p in content):
                counters.skip("no_image", where, "the document has no image part")
            return None
        return Document(parts)


def encode_document(document: Document, tokenizer, max_tokens: int) -> tuple[list[int], list[bool], list[Tiled]]:
    """`[bos] text <|image|> text ... [eos]` → (tokens, loss mask, the images whose token is kept, in order).

    The mask marks every text token and the eos as a target (not bos, not `<|image|>`: where an image goes
    is given, not predicted). A document longer than `max_tokens` is cut there and the images past the cut
    dropped; SkipSample when no image token is left.
    """
    tokens, mask, images = [tokenizer.bos_id], [False], []
    for part in document.parts:
        if isinstance(part, Tiled):
            tokens.append(tokenizer.image_id)
            mask.append(False)
            images.append(part)
        else:
            ids = tokenizer.encode(part, bos=False, eos=False)
            tokens += ids
            mask += [True] * len(ids)
    tokens.append(tokenizer.eos_id)
    mask.append(True)
    tokens, mask = tokens[:max_tokens], mask[:max_tokens]
    images = images[: tokens.count(tokenizer.image_id)]
    if not images:
        raise SkipSample(f"no <|image|> within the first {max_tokens} tokens")
    return tokens, mask, images


# ------------------------------------------------------------------------------------------- the loader

Example = Any  # what a task's `make_example` returns for one sample
MakeExample = Callable[[dict, Tiled, int], Example]  # (sample, image, seed for this sample and epoch) -> example


class ImageSourceStream(SourceStream):
    """`SourceStream` whose items are examples built from decoded images instead of texts.

    Set `decoder`, `make_example` and `image_counters` after construction. `make_example` raises
    SkipSample for a sample it cannot use (no caption, no question).
    """

    decoder: ImageDecoder
    make_example: MakeExample
    image_counters: ImageCounters

    kind = "image sample"

    def example(self, sample: dict, shard: int, epoch: int) -> Example:
        image = self.decoder(sample, self.image_counters)
        if image is None:
            raise SkipSample("unusable image (counted by reason)")
        return self.make_example(sample, image, derive_seed(self.seed, sample.get("__key__"), epoch))


@dataclass
class DocumentSources:
    """The training sources whose samples are interleaved documents, and how a task makes their examples:
    `make_example(sample, document, seed)` (a `Document` of at most `max_images` images)."""

    names: tuple[str, ...]
    make_example: MakeExample
    max_images: int


@dataclass
class _Plan:
    """Everything a consumer needs; pickled into DataLoader workers."""

    cfg: DataConfig
    urls: dict[str, list[str]]
    decoder: ImageDecoder
    make_example: MakeExample
    collate: Callable[[list], Any]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    workers: int
    documents: DocumentSources | None = None
    document_decoder: DocumentDecoder | None = None


def consumer_batches(plan: _Plan, worker: int, state: dict) -> Iterator[tuple[Any, dict]]:
    """Endless `(batch, state after it)` of one logical worker of one rank."""
    counters = Counters.from_dict(state.get("stats"))
    images = ImageCounters.from_dict(state.get("images"))
    consumer, n_consumers = plan.rank * plan.workers + worker, plan.world_size * plan.workers
    streams = []
    for s in plan.cfg.sources:
        stream = ImageSourceStream(s, plan.urls[s.name], consumer, n_consumers, plan.seed, plan.cfg.shuffle,
                                   plan.cfg.shuffle_buffer, counters)
        stream.decoder, stream.make_example, stream.image_counters = plan.decoder, plan.make_example, images
        if plan.documents is not None and s.name in plan.documents.names:
            stream.decoder, stream.make_example = plan.document_decoder, plan.documents.make_example
        streams.append(stream)
    mixture = Mixture([s.weight for s in plan.cfg.sources], plan.seed, consumer)
    examples = mixed_documents(streams, mixture, state.get("position") or start_position(streams))
    while True:
        chunk = [next(examples) for _ in range(plan.batch_size)]
        counters.documents += len(chunk)
        last = chunk[-1][1]  # where the batch's last example stands; resume one past it
        position = {"n": last["n"] + 1, "cursors": {k: list(v) for k, v in last["cursors"].items()}}
        position["cursors"][plan.cfg.sources[mixture.choose(last["n"])].name][2] += 1
        yield plan.collate([e for e, _ in chunk]), {"position": position, "stats": counters.to_dict(),
                                                    "images": images.to_dict()}


class _WorkerStreams(IterableDataset):
    def __init__(self, plan: _Plan, states: list[dict], first: int, buffers: BufferPool | None = None):
        self.plan, self.states, self.first, self.buffers = plan, states, first, buffers

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.first) % self.plan.workers
        if self.buffers is not None and info is not None:
            keep_freed_memory()
            self.buffers.enter(info.id)  # `collate_images` builds image batches in the pool's buffers
        for batch, state in consumer_batches(self.plan, worker, self.states[worker]):
            yield batch, worker, state, take_lent()


class ImageLoader:
    """Endless batches of image examples for one rank, resumable at any batch (see the module docstring).

    `make_example(sample, tiled_image, seed)` turns one decoded sample into a task's example (the seed is
    a pure function of run seed, sample key and epoch, for choices such as which question to ask);
    `collate(examples)` makes the batch. Both run in the workers, so they must pickle (module-level
    functions or classes). `data.num_workers` worker processes per rank; 0 reads in this process.
    `uint8=True`: tiles stay uint8 (a quarter of the bytes from the workers); `model_images` normalises them.
    `documents`: sources holding interleaved documents, whose samples go to `documents.make_example` as a
    `Document` instead.
    """

    def __init__(self, cfg: DataConfig, make_example: MakeExample, collate: Callable[[list], Any], *, batch_size: int,
                 seed: int, tile_size: int, max_tiles: int, rank: int = 0, world_size: int = 1,
                 max_pixels: int = MAX_PIXELS, uint8: bool = False, documents: DocumentSources | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if documents is not None:
            unknown = sorted(set(documents.names) - {s.name for s in cfg.sources})
            if unknown:
                raise ValueError(f"document sources {unknown} are not among data.sources "
                                 f"({', '.join(s.name for s in cfg.sources)})")
        urls = {s.name: source_shards(s, cfg.root) for s in cfg.sources}
        decoder = ImageDecoder(tile_size, max_tiles, max_pixels, uint8)
        self._plan = _Plan(cfg, urls, decoder, make_example, collate, batch_size, seed, rank, world_size,
                           max(1, cfg.num_workers), documents,
                           DocumentDecoder(decoder, documents.max_images) if documents is not None else None)
        self._states: list[dict] = [{} for _ in range(self._plan.workers)]
        self._next = 0

    def __iter__(self) -> Iterator[Any]:
        plan = self._plan
        if plan.cfg.num_workers == 0:
            for batch, state in consumer_batches(plan, 0, self._states[0]):
                self._states[0] = state
                yield batch
            return
        # per worker: PREFETCH batches in flight, the consumer's batch and its previous one, one being built
        buffers = BufferPool(plan.workers, per_worker=PREFETCH + 3)
        dataset = _WorkerStreams(plan, [dict(s) for s in self._states], self._next, buffers)
        batches = iter(DataLoader(dataset, batch_size=None, num_workers=plan.workers, in_order=True,
                                  prefetch_factor=PREFETCH))
        try:
            for batch, worker, state, lent in batches:
                buffers.hold(lent)
                self._states[worker] = state
                self._next = (worker + 1) % plan.workers
                yield batch
                del batch, lent
                buffers.release_unused()  # the buffers of batches the consumer has dropped
        finally:
            batches._shutdown_workers()  # promptly, not when the garbage collector finds the iterator

    def _identity(self) -> dict:
        p = self._plan
        return {"seed": p.seed, "rank": p.rank, "world_size": p.world_size, "workers": p.workers,
                "sources": {name: len(urls) for name, urls in p.urls.items()}}

    def state_dict(self) -> dict:
        """Plain dicts, lists and numbers: per logical worker its mixing position and counters, and the next worker."""
        return {"format": STATE_FORMAT, **self._identity(), "next_worker": self._next,
                "positions": [dict(s) for s in self._states]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an ImageLoader state (expected format {STATE_FORMAT!r})")
        mine = self._identity()
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError("the image loader state was saved under different settings, so it cannot continue "
                             "exactly: " + "; ".join(diff))
        self._states = [dict(s) for s in state["positions"]]
        self._next = int(state["next_worker"])

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from the states of all ranks of a run (`states[r]` is rank r's `state_dict()`): exactly with the
        same number of ranks and workers, else from the positions re-split (`resplit`; the counters of all old
        workers go to rank 0's first worker)."""
        p = self._plan
        check_states(states, STATE_FORMAT, "an ImageLoader", self._identity(), ("seed", "sources"))
        if len(states) == p.world_size and states[p.rank].get("workers") == p.workers:
            self.load_state_dict(states[p.rank])
            return
        old = worker_states(states)
        first = p.rank * p.workers
        positions = resplit([w.get("position") for w in old], {name: len(urls) for name, urls in p.urls.items()},
                            p.world_size * p.workers, range(first, first + p.workers))
        stats, images = summed([w.get("stats") for w in old]), summed([w.get("images") for w in old])
        self._states = [{"position": pos, **({"stats": stats, "images": images} if first + w == 0 else {})}
                        for w, pos in enumerate(positions)]
        self._next = 0

    def stats(self) -> dict:
        """`skipped_samples`, `skipped_shards`, `examples`, `decoded_images`, `skipped_images` by reason,
        `truncated_documents` (interleaved documents cut at `max_images`)."""
        counters = [Counters.from_dict(s.get("stats")) for s in self._states]
        images = [ImageCounters.from_dict(s.get("images")) for s in self._states]
        reasons: dict[str, int] = {}
        for c in images:
            for k, v in c.skipped.items():
                reasons[k] = reasons.get(k, 0) + v
        return {"skipped_samples": sum(c.skipped_samples for c in counters),
                "skipped_shards": sum(c.skipped_shards for c in counters),
                "examples": sum(c.documents for c in counters),
                "decoded_images": sum(c.decoded for c in images), "skipped_images": reasons,
                "truncated_documents": sum(c.truncated for c in images)}


def heldout_examples(cfg: DataConfig, make_example: MakeExample, *, tile_size: int, max_tiles: int, seed: int,
                     limit: int, max_pixels: int = MAX_PIXELS, decoder=None) -> tuple[list, ImageCounters]:
    """Up to `limit` examples of `cfg.heldout`: sources, shards and samples in listed order, read once.
    `decoder(sample, counters)` turns a sample into the media `make_example` takes (default: one tiled image)."""
    decoder = decoder or ImageDecoder(tile_size, max_tiles, max_pixels)
    counters, images = Counters(), ImageCounters()
    out: list = []
    for source in cfg.heldout:
        for url in source_shards(source, cfg.root):
            for sample in read_shard(url, counters.skip):
                if len(out) >= limit:
                    return out, images
                image = decoder(sample, images)
                if image is None:
                    continue
                try:
                    out.append(make_example(sample, image, derive_seed(seed, sample.get("__key__"), 0)))
                except SkipSample as e:
                    counters.skip("sample", f"{url} sample '{sample.get('__key__')}': {e}")
    return out, images


def collate_images(tiled: list[Tiled | list[Tiled]], max_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (or a list of images) per example → images `[batch, n_images, max_tiles, 3, tile, tile]` (the
    tiles' dtype; n_images the most any example has, empty slots zero), aspect ratios `[batch, n_images, 2]`.

    Equal to `stack_images` of the tiles. Resized images (`Tiled.resized`) are cut straight into their tile slots,
    and in a DataLoader worker the batch is written straight into shared memory (as torch's `default_collate`
    does): a batch made in private memory is copied into shared memory again when it is sent.
    """
    batch = [x if isinstance(x, list) else [x] for x in tiled]
    n = max((len(sample) for sample in batch), default=0)
    if n == 0:
        raise ValueError("collate_images needs at least one image in the batch")
    first = next(sample[0] for sample in batch if sample)
    shape = torch.Size((len(batch), n, max_tiles, 3, first.tile_size, first.tile_size))
    if get_worker_info() is not None:  # a reused buffer of `ImageLoader`'s workers, or a new one
        storage = shared_storage(shape.numel() * first.dtype.itemsize)
        images = torch.empty(0, dtype=first.dtype).set_(storage, 0, shape)
    else:
        images = torch.empty(shape, dtype=first.dtype)
    ratios = torch.zeros(len(batch), n, 2, dtype=torch.long)
    for b, sample in enumerate(batch):
        for j, image in enumerate(sample):
            rows, cols = image.grid
            if rows * cols > max_tiles:
                raise ValueError(f"example {b} image {j}: {rows * cols} tiles for a {rows}x{cols} grid "
                                 f"(max_tiles={max_tiles})")
            image.cut_into(images[b, j])
            images[b, j, rows * cols :] = 0
            ratios[b, j, 0], ratios[b, j, 1] = rows, cols
        images[b, len(sample) :] = 0
    return images, ratios

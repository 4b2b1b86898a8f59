"""Video shards: the sample schema, uniform frame sampling, frame decoding with corrupt-frame accounting, the loader.

torchvision 0.26 cannot decode video files, so a video is stored as its frames, one image member per frame
(WebDataset tar files; members of one sample share `__key__`, which holds no dots):

| member                         | content                                                              |
|--------------------------------|----------------------------------------------------------------------|
| `<key>.000.jpg`, `<key>.001.jpg`, … | the frames in time order: a zero-padded frame number (3 or more digits), then `jpg`/`jpeg`/`png`/`webp` |
| `<key>.txt`                    | optional caption                                                     |
| `<key>.json`                   | `caption` (overrides `.txt`), `qa`: a list of `{"type", "question", "answer"}` (video QA), optional `fps`, `num_frames`, `source` |

WebDataset splits a member name at its first dot, so frame `000.jpg` of sample `clip7` is the member
`clip7.000.jpg` and appears in the sample dict under the key `"000.jpg"`. Frames are ordered by their number.

Sampling (SPEC §4.1): up to `max_frames` frames, uniformly: frame i of n is stored frame ⌊(i + ½)·F / n⌋ of F.
Only the chosen frames are decoded, each with `decode_image` (the image path's checks); an unusable frame is
skipped and counted by reason like an image (`empty`, `truncated`, `wrong_extension`, `too_large`,
`undecodable`), and the video keeps its other frames. A video with no usable frame is counted as `no_frames`.
Each frame is tiled like an image (a square frame of at most one tile side is one tile).

`VideoLoader` is `ImageLoader` with a frame decoder: the same deterministic per-(rank, worker) walk,
round-robin DataLoader workers and exact resume; `decoded_images` counts decoded frames.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from encoders.vision.transform import tile_image

from .config import DataConfig
from .image_text import (MAX_PIXELS, ImageCounters, ImageError, ImageLoader, MakeExample, Tiled, decode_image,
                         heldout_examples)

FRAME_MEMBER = re.compile(r"(\d{3,})\.(jpg|jpeg|png|webp)")


def frame_members(sample: dict) -> list[str]:
    """The sample's frame member names (`000.jpg`, …) in frame order."""
    found = [(int(m.group(1)), name) for name in sample if (m := FRAME_MEMBER.fullmatch(name))]
    return [name for _, name in sorted(found)]


def sample_frames(n_stored: int, max_frames: int) -> list[int]:
    """Indices of up to `max_frames` frames spread uniformly over `n_stored` (all of them when there are fewer)."""
    if n_stored <= 0 or max_frames <= 0:
        return []
    n = min(n_stored, max_frames)
    return [int((i + 0.5) * n_stored / n) for i in range(n)]


@dataclass
class Clip:
    """One decoded video: its sampled frames, each cut into tiles like an image."""

    frames: list[Tiled]


class VideoDecoder:
    """A shard sample → `Clip` of up to `max_frames` uniformly sampled frames (None after counting why)."""

    def __init__(self, tile_size: int, max_tiles: int, max_frames: int, max_pixels: int = MAX_PIXELS):
        self.tile_size, self.max_tiles, self.max_frames, self.max_pixels = tile_size, max_tiles, max_frames, max_pixels

    def __call__(self, sample: dict, counters: ImageCounters) -> Clip | None:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        names = frame_members(sample)
        frames = []
        for index in sample_frames(len(names), self.max_frames):
            name = names[index]
            try:
                pixels = decode_image(sample[name], name.rsplit(".", 1)[1], self.max_pixels)
            except ImageError as e:
                counters.skip(e.reason, f"{where} frame {name}", str(e))
                continue
            counters.decoded += 1
            frames.append(Tiled(*tile_image(pixels, self.tile_size, self.max_tiles)))
        if not frames:
            counters.skip("no_frames", where, f"no usable frame among {len(names)} frame members (NNN.jpg, ...)")
            return None
        return Clip(frames)


class VideoLoader(ImageLoader):
    """`ImageLoader` whose decoder makes `Clip`s: `make_example(sample, clip, seed)` builds a task's example.

    `stats()` is ImageLoader's: `decoded_images` counts frames, `skipped_images` frames by reason and `no_frames` videos.
    """

    def __init__(self, cfg: DataConfig, make_example: MakeExample, collate, *, batch_size: int, seed: int,
                 tile_size: int, max_tiles: int, max_frames: int, rank: int = 0, world_size: int = 1,
                 max_pixels: int = MAX_PIXELS):
        super().__init__(cfg, make_example, collate, batch_size=batch_size, seed=seed, tile_size=tile_size,
                         max_tiles=max_tiles, rank=rank, world_size=world_size, max_pixels=max_pixels)
        # ImageLoader takes its decoder from the plan; every other part of the walk is the image one.
        self._plan = replace(self._plan, decoder=VideoDecoder(tile_size, max_tiles, max_frames, max_pixels))


def heldout_video_examples(cfg: DataConfig, make_example: MakeExample, *, tile_size: int, max_tiles: int,
                           max_frames: int, seed: int, limit: int, max_pixels: int = MAX_PIXELS
                           ) -> tuple[list, ImageCounters]:
    """Up to `limit` examples of `cfg.heldout` (clips), as `image_text.heldout_examples` reads images."""
    return heldout_examples(cfg, make_example, tile_size=tile_size, max_tiles=max_tiles, seed=seed, limit=limit,
                            decoder=VideoDecoder(tile_size, max_tiles, max_frames, max_pixels))


def collate_videos(clips: list[Clip], max_tiles: int, frames_per_group: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One video per example → videos `[batch, 1, frames, max_tiles, 3, S, S]`, aspect ratios `[batch, 1, frames, 2]`,
    frame_mask bool `[batch, 1, frames]`; `frames` = the longest clip rounded up to a multiple of `frames_per_group`.
    """
    if not clips or any(not c.frames for c in clips):
        raise ValueError("collate_videos needs clips with at least one frame each")
    longest = max(len(c.frames) for c in clips)
    frames = -(-longest // frames_per_group) * frames_per_group
    size = clips[0].frames[0].tiles.shape[-1]
    videos = torch.zeros(len(clips), 1, frames, max_tiles, 3, size, size)
    ratios = torch.zeros(len(clips), 1, frames, 2, dtype=torch.long)
    mask = torch.zeros(len(clips), 1, frames, dtype=torch.bool)
    for b, clip in enumerate(clips):
        for f, frame in enumerate(clip.frames):
            rows, cols = frame.grid
            if frame.tiles.shape[0] != rows * cols or rows * cols > max_tiles:
                raise ValueError(f"clip {b} frame {f}: {frame.tiles.shape[0]} tiles for a {rows}x{cols} grid "
                                 f"(max_tiles={max_tiles})")
            videos[b, 0, f, : rows * cols] = frame.tiles
            ratios[b, 0, f] = torch.tensor([rows, cols])
            mask[b, 0, f] = True
    return videos, ratios, mask


def frames_from_folder(folder, tile_size: int, max_tiles: int, max_frames: int, max_pixels: int = MAX_PIXELS
                       ) -> tuple[Clip, ImageCounters]:
    """A folder of frame images (sorted by name) → the `Clip` a model takes, as the loader would sample and tile it.

    For inference: `collate_videos([clip], max_tiles, frames_per_group)` gives `MultimodalModel`'s
    `videos`, `video_aspect_ratios` and `frame_mask`. Unusable frames are skipped and counted; no usable
    frame is a ValueError naming the folder.
    """
    from .pack_video import frame_files  # pack_video imports this module

    folder = Path(folder)
    files = frame_files(folder)
    sample = {"__key__": folder.name, "__url__": str(folder)}
    for i, path in enumerate(files):
        ext = path.suffix.lower().lstrip(".")
        sample[f"{i:06d}.{ext if ext in ('jpg', 'jpeg', 'png', 'webp') else 'jpg'}"] = path.read_bytes()
    counters = ImageCounters()
    clip = VideoDecoder(tile_size, max_tiles, max_frames, max_pixels)(sample, counters)
    if clip is None:
        raise ValueError(f"{folder}: no usable frame among {len(files)} image files ({counters.skipped})")
    return clip, counters

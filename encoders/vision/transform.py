"""Variable-resolution tiling of one image (SPEC §4.3; Meta's `VariableSizeImageTransform`).

1. Among all tile grids with at most `max_num_tiles` tiles, pick the canvas that needs the smallest
   upscale ≥ 1, else the least downscale; ties go to the smallest area.
2. Resize without distortion, upscaling no further than one tile side.
3. Pad with black at the bottom and right, scale to [0, 1], normalise with CLIP's mean and std.
4. Cut into `rows × cols` tiles in row-major order.

`tile_image` does all of it. Data loaders split it: `tile_image_uint8` (steps 1, 2, 4 and the padding) in
their worker processes, whose tiles cross process boundaries at a quarter of the float size, and
`normalize_images` on a whole batch where it is consumed; the result is bit for bit `tile_image`'s.
`tile_image_uint8` is `resize_to_canvas` (steps 1 and 2) then `cut_tiles` (padding and step 4, each tile
written once from the resized image); a loader calls the two apart to cut straight into a batch's tile slots.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every tile grid (rows, cols) with rows·cols ≤ max_num_tiles, in lexicographic order.

    For 4 tiles: (1,1) (1,2) (1,3) (1,4) (2,1) (2,2) (3,1) (4,1); the position in this list plus one
    is `transformers`' `aspect_ratio_id` (0 there means "no image").
    """
    if max_num_tiles <= 0:
        raise ValueError(f"max_num_tiles must be positive, got {max_num_tiles}")
    return tuple((r, c) for r in range(1, max_num_tiles + 1) for c in range(1, max_num_tiles + 1)
                 if r * c <= max_num_tiles)


def best_canvas(height: int, width: int, tile_size: int, max_num_tiles: int) -> tuple[int, int]:
    """The tile grid (rows, cols) an image of `height × width` pixels is resized onto."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    grids = supported_aspect_ratios(max_num_tiles)
    # The limiting side decides how far an image can be scaled onto a canvas without distortion.
    scales = [min(r * tile_size / height, c * tile_size / width) for r, c in grids]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    candidates = [g for g, s in zip(grids, scales) if s == chosen]
    return min(candidates, key=lambda g: g[0] * g[1])


def fit_size(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """(new_h, new_w): the largest undistorted size inside the canvas, upscaled at most to `tile_size`."""
    target_h = min(max(height, tile_size), canvas_h)
    target_w = min(max(width, tile_size), canvas_w)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(max(math.floor(height * scale_w), 1), target_h), target_w
    return target_h, min(max(math.floor(width * scale_h), 1), target_w)


def _as_uint8_chw(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, height, width], got {list(image.shape)}")
        if image.dtype != torch.uint8:
            raise ValueError(f"image tensor must be uint8 (0..255), got {image.dtype}")
        return image
    raise TypeError(f"expected a PIL image or a uint8 tensor [3, H, W], got {type(image).__name__}")


def resize_to_canvas(image, tile_size: int, max_num_tiles: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Steps 1 and 2: (the image resized, uint8 `[3, new_h, new_w]` in `TF.resize`'s layout, grid (rows, cols)).

    `cut_tiles` pads and cuts it; a data loader can have it cut straight into a batch's tile slots.
    """
    x = _as_uint8_chw(image)
    h, w = x.shape[-2:]
    rows, cols = best_canvas(h, w, tile_size, max_num_tiles)
    new_h, new_w = fit_size(h, w, rows * tile_size, cols * tile_size, tile_size)
    return TF.resize(x, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True), (rows, cols)


def cut_tiles(resized: torch.Tensor, grid: tuple[int, int], tile_size: int, out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """`resize_to_canvas`'s image padded with black at the bottom and right and cut into row-major tiles
    `[rows·cols, 3, tile, tile]`, each pixel written once (no padded canvas, no second copy to cut it).

    `out`: tile slots `[≥ rows·cols, 3, tile, tile]` to write into (such as one image's slots of a batch).
    """
    rows, cols = grid
    h, w = resized.shape[-2:]
    if h > rows * tile_size or w > cols * tile_size:
        raise ValueError(f"a {h}x{w} image does not fit a {rows}x{cols} grid of {tile_size}-pixel tiles")
    if out is None:
        out = torch.empty(rows * cols, 3, tile_size, tile_size, dtype=resized.dtype)
    for r in range(rows):
        top = r * tile_size
        th = min(max(h - top, 0), tile_size)
        for c in range(cols):
            tile, left = out[r * cols + c], c * tile_size
            tw = min(max(w - left, 0), tile_size)
            if th == 0 or tw == 0:
                tile.zero_()
                continue
            tile[:, :th, :tw].copy_(resized[:, top : top + th, left : left + tw])
            if th < tile_size:
                tile[:, th:].zero_()
            if tw < tile_size:
                tile[:, :th, tw:].zero_()
    return out[: rows * cols]


def tile_image_uint8(image, tile_size: int, max_num_tiles: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """`tile_image` before normalisation: (tiles `[rows·cols, 3, tile, tile]` uint8, black padding, (rows, cols))."""
    resized, grid = resize_to_canvas(image, tile_size, max_num_tiles)
    return cut_tiles(resized, grid, tile_size), grid


def normalize_tiles(tiles: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 pixels `[..., 3, S, S]` → float `(x / 255 − mean) / std`, the same operations in the same order as
    `tile_image` (so the same bits on any device that rounds IEEE float32 division correctly)."""
    if tiles.dtype != torch.uint8:
        raise ValueError(f"normalize_tiles takes uint8 pixels, got {tiles.dtype}")
    return TF.normalize(tiles.float() / 255.0, list(mean), list(std))


def tile_image(image, tile_size: int, max_num_tiles: int, mean=CLIP_MEAN, std=CLIP_STD
               ) -> tuple[torch.Tensor, tuple[int, int]]:
    """A PIL image or uint8 `[3, H, W]` tensor → (tiles `[rows·cols, 3, tile, tile]` float, (rows, cols))."""
    tiles, grid = tile_image_uint8(image, tile_size, max_num_tiles)
    return normalize_tiles(tiles, mean, std), grid


def stack_images(batch: list[list[tuple[torch.Tensor, tuple[int, int]]]], max_num_tiles: int,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample lists of `tile_image` outputs → images `[B, N, max_tiles, 3, S, S]`, ratios `[B, N, 2]`.

    Empty slots (a sample with fewer than N images) hold zero pixels and aspect ratio (0, 0). The images keep
    the tiles' dtype (float from `tile_image`, uint8 from `tile_image_uint8`: then see `normalize_images`).
    `out`: a tensor of exactly that shape and dtype to fill (whatever it held) instead of a new one, such as a
    batch in shared memory that a data loader worker hands over without a copy (`stack_shape` gives the shape).
    """
    shape, dtype = stack_shape(batch, max_num_tiles)
    if out is None:
        images = torch.zeros(shape, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out is {list(out.shape)} {out.dtype}, the batch needs {list(shape)} {dtype}")
    else:
        images = out
    ratios = torch.zeros(shape[0], shape[1], 2, dtype=torch.long)
    for b, sample in enumerate(batch):
        for j, (tiles, (rows, cols)) in enumerate(sample):
            if tiles.shape[0] != rows * cols or tiles.shape[0] > max_num_tiles:
                raise ValueError(f"sample {b} image {j}: {tiles.shape[0]} tiles for a {rows}x{cols} grid "
                                 f"(max_num_tiles={max_num_tiles})")
            images[b, j, : rows * cols] = tiles
            if out is not None:
                images[b, j, rows * cols :] = 0
            ratios[b, j, 0], ratios[b, j, 1] = rows, cols
        if out is not None:
            images[b, len(sample) :] = 0
    return images, ratios


def stack_shape(batch: list[list[tuple[torch.Tensor, tuple[int, int]]]], max_num_tiles: int
                ) -> tuple[torch.Size, torch.dtype]:
    """The shape `[B, N, max_tiles, 3, S, S]` and dtype of `stack_images(batch, max_num_tiles)`'s images."""
    n = max((len(sample) for sample in batch), default=0)
    if n == 0:
        raise ValueError("stack_images needs at least one image in the batch")
    first = batch[next(i for i, s in enumerate(batch) if s)][0][0]
    return torch.Size((len(batch), n, max_num_tiles, 3, first.shape[-1], first.shape[-1])), first.dtype


def normalize_images(images: torch.Tensor, aspect_ratios: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """`stack_images` of `tile_image_uint8` tiles (uint8 `[B, N, max_tiles, 3, S, S]`, ratios `[B, N, 2]`) → the
    float images `stack_images` makes of `tile_image` tiles: real tiles normalised, empty tile slots zero.

    The operations are `normalize_tiles`' (the same bits), applied in place a few tiles at a time on a CPU, where a
    whole batch per operation would stream it through memory four times.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"normalize_images takes uint8 pixels, got {images.dtype}")
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    src, dst = images.reshape(-1, *images.shape[-3:]), out.view(-1, *images.shape[-3:])
    m = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    step = 4 if images.device.type == "cpu" else max(1, dst.shape[0])
    for i in range(0, dst.shape[0], step):
        dst[i : i + step].copy_(src[i : i + step]).div_(255.0).sub_(m).div_(s)
    n_tiles = (aspect_ratios[..., 0] * aspect_ratios[..., 1]).to(images.device)
    real = torch.arange(images.shape[2], device=images.device) < n_tiles[..., None]  # [B, N, max_tiles]
    return dst.index_fill_(0, (~real).flatten().nonzero().squeeze(1), 0.0).view(images.shape)

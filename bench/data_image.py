"""The image-text pipeline's throughput against the decode-and-resize limit, in one run.

Pipeline: `ImageLoader` with `--workers` DataLoader workers (tar reading, shuffling, corrupt-image
checks, JPEG decoding, tiling with resize and normalisation, batching), timed in steady state
(after every worker has delivered its first batch). Limit: the same JPEG bytes decoded with
`torchvision.io.decode_jpeg` and tiled with `tile_image` in a tight loop, split over a pool of the same
number of processes (one thread each). Rounds alternate between the two; medians are reported.

    python bench/data_image.py [--images 1536] [--workers 2] [--width 448 --height 336] [--tile 224]
"""
from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402

from encoders.vision.transform import tile_image  # noqa: E402
from mm_llama.data.config import DataConfig  # noqa: E402
from mm_llama.data.demo_vision import jpeg_bytes  # noqa: E402
from mm_llama.data.image_text import ImageLoader, collate_images  # noqa: E402


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients plus texture noise: JPEG-compresses like a photograph, not like flat art."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 9) * y) for _ in range(3)]
    base = (np.stack(channels, -1) * 0.5 + 0.5) * 200 + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


class TilesOnly:
    """The example a training task would build, minus its text: the tiled image."""

    def __call__(self, sample, image, seed):
        return image


class CollateTiles:
    def __init__(self, max_tiles: int):
        self.max_tiles = max_tiles

    def __call__(self, examples):
        return collate_images(examples, self.max_tiles)


def _limit_chunk(args) -> int:
    jpegs, tile, max_tiles = args
    torch.set_num_threads(1)
    for data in jpegs:
        tile_image(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), tile, max_tiles)
    return len(jpegs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--height", type=int, default=336)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tile", type=int, default=224)
    p.add_argument("--max-tiles", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        jpegs = [jpeg_bytes(photo_like(a.width, a.height, i)) for i in range(a.images)]
        for s in range(a.shards):
            with wds.TarWriter(str(Path(tmp) / f"img-{s:06d}.tar")) as sink:
                for i in range(s, a.images, a.shards):
                    sink.write({"__key__": f"i{i:07d}", "jpg": jpegs[i], "txt": "x"})
        cfg = DataConfig(root=tmp, sources=[{"name": "img", "shards": "img-*.tar"}], num_workers=a.workers)
        n_batches = a.images // a.batch

        def pipeline() -> float:
            loader = ImageLoader(cfg, TilesOnly(), CollateTiles(a.max_tiles), batch_size=a.batch, seed=0,
                                 tile_size=a.tile, max_tiles=a.max_tiles)
            it = iter(loader)
            for _ in range(max(1, a.workers)):  # worker start-up is not throughput
                next(it)
            t0 = time.perf_counter()
            for _ in range(n_batches):
                next(it)
            seconds = time.perf_counter() - t0
            del it
            return n_batches * a.batch / seconds

        pool = multiprocessing.get_context("fork").Pool(max(1, a.workers))
        chunks = [(jpegs[w :: max(1, a.workers)], a.tile, a.max_tiles) for w in range(max(1, a.workers))]
        pool.map(_limit_chunk, [(c[0][:8], a.tile, a.max_tiles) for c in chunks])  # warm the processes

        def limit() -> float:
            t0 = time.perf_counter()
            done = sum(pool.map(_limit_chunk, chunks))
            return done / (time.perf_counter() - t0)

        rates = {"pipeline": [], "limit": []}
        for _ in range(a.repeats):
            rates["pipeline"].append(pipeline())
            rates["limit"].append(limit())
        pool.close()
        pool.join()

    info = _common.machine()
    pipe, lim = statistics.median(rates["pipeline"]), statistics.median(rates["limit"])
    print(f"{info['date']} | {info['cpu']} | {info['cores']} cores | torch {info['torch']} | commit {info['commit']}")
    print(f"{a.images} JPEGs {a.width}x{a.height} (mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB), "
          f"tiles {a.tile} px up to {a.max_tiles}, batch {a.batch}, {a.workers} workers/processes, {a.repeats} rounds")
    print(_common.markdown_table(
        ["", "samples/s (median)", "rounds"],
        [["pipeline (ImageLoader)", f"{pipe:.1f}", ", ".join(f"{r:.1f}" for r in rates["pipeline"])],
         ["limit (decode_jpeg + tile_image)", f"{lim:.1f}", ", ".join(f"{r:.1f}" for r in rates["limit"])],
         ["pipeline / limit", f"{pipe / lim:.3f}", ""]]))


if __name__ == "__main__":
    main()

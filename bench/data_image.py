"""The image-text pipeline's throughput against the decode-and-resize limit, in one run.

Pipeline: `ImageLoader` with `--workers` DataLoader workers (tar reading, shuffling, corrupt-image
checks, JPEG decoding, tiling with resize, batching) shipping uint8 tiles, timed in steady state (after
every worker has delivered its first batch): as delivered (a GPU trainer normalises them on the device),
and normalised in the main process with `model_images` (what the vision stage does at the model's input
when the device is the CPU). Beside them the previous float path (workers normalise and ship float32
tiles). Limit: the same JPEG bytes decoded with `torchvision.io.decode_jpeg` and tiled with
`tile_image` (normalisation included) in a tight loop, split over a pool of the same number of processes
(one thread each), and the same with `tile_image_uint8` (the limit of the uint8 batches: the same
`resize_to_canvas` and `cut_tiles` the loader runs, into a new tensor per image where the loader cuts into
the batch, so a faster tiling speeds up both sides and the ratio shows the loader's own cost). Rounds alternate
between all five; medians are reported, with the load average. Beside samples/s, the CPU time per sample of
this process and all its children (loader workers, pool processes; read from /proc): on a machine shared
with other jobs the wall-clock rates swing with their load, the CPU each sample costs much less.

    python bench/data_image.py [--images 1536] [--workers 2] [--width 448 --height 336] [--tile 224]
                               [--runs uint8,limit_uint8]  (some rows only; default all five)
"""
from __future__ import annotations

import _common  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

import argparse  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402

from encoders.vision.transform import tile_image, tile_image_uint8  # noqa: E402
from mm_llama.data.config import DataConfig  # noqa: E402
from mm_llama.data.demo_vision import jpeg_bytes  # noqa: E402
from mm_llama.data.image_text import ImageLoader, collate_images, model_images  # noqa: E402
from mm_llama.data.shards import TAR_MTIME  # noqa: E402


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


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (Linux /proc)."""
    tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), time.process_time()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == me:  # fields after the name: state, ppid, ..., utime (12th), stime (13th)
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _limit_chunk(args) -> int:
    jpegs, tile, max_tiles, uint8 = args
    torch.set_num_threads(1)
    tiler = tile_image_uint8 if uint8 else tile_image
    for data in jpegs:
        tiler(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB), tile, max_tiles)
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
    p.add_argument("--runs", default="uint8,limit_uint8,pipeline,float,limit",
                   help="which measurements, comma-separated (default all: the rows of the table)")
    a = p.parse_args()
    wanted = a.runs.split(",")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        jpegs = [jpeg_bytes(photo_like(a.width, a.height, i)) for i in range(a.images)]
        for s in range(a.shards):
            with wds.TarWriter(str(Path(tmp) / f"img-{s:06d}.tar"), mtime=TAR_MTIME) as sink:
                for i in range(s, a.images, a.shards):
                    sink.write({"__key__": f"i{i:07d}", "jpg": jpegs[i], "txt": "x"})
        cfg = DataConfig(root=tmp, sources=[{"name": "img", "shards": "img-*.tar"}], num_workers=a.workers)
        n_batches = a.images // a.batch

        def pipeline(uint8: bool, normalise: bool = True) -> tuple[float, float]:
            """(samples/s, CPU seconds per sample)"""
            loader = ImageLoader(cfg, TilesOnly(), CollateTiles(a.max_tiles), batch_size=a.batch, seed=0,
                                 tile_size=a.tile, max_tiles=a.max_tiles, uint8=uint8)
            it = iter(loader)
            for _ in range(max(1, a.workers)):  # worker start-up is not throughput
                next(it)
            cpu, t0 = _cpu_seconds(), time.perf_counter()
            for _ in range(n_batches):
                images, ratios = next(it)
                if normalise:
                    model_images(images, ratios)  # float batches pass through; uint8 ones are normalised here
            seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu  # workers prefetch as much after as before
            del it
            return n_batches * a.batch / seconds, cpu / (n_batches * a.batch)

        pool = multiprocessing.get_context("fork").Pool(max(1, a.workers))
        shares = [jpegs[w :: max(1, a.workers)] for w in range(max(1, a.workers))]
        pool.map(_limit_chunk, [(c[:8], a.tile, a.max_tiles, False) for c in shares])  # warm the processes

        def limit(uint8: bool) -> tuple[float, float]:
            cpu, t0 = _cpu_seconds(), time.perf_counter()
            done = sum(pool.map(_limit_chunk, [(c, a.tile, a.max_tiles, uint8) for c in shares]))
            return done / (time.perf_counter() - t0), (_cpu_seconds() - cpu) / done

        runs = {"uint8": lambda: pipeline(uint8=True, normalise=False), "limit_uint8": lambda: limit(uint8=True),
                "pipeline": lambda: pipeline(uint8=True), "float": lambda: pipeline(uint8=False),
                "limit": lambda: limit(uint8=False)}
        unknown = sorted(set(wanted) - set(runs))
        if unknown:
            p.error(f"--runs: unknown {unknown}; choose from {', '.join(runs)}")
        runs = {k: v for k, v in runs.items() if k in wanted}
        rates: dict[str, list[float]] = {k: [] for k in runs}
        cpus: dict[str, list[float]] = {k: [] for k in runs}
        load = [os.getloadavg()[0]]
        for _ in range(a.repeats):
            for k, run in runs.items():
                rate, cpu = run()
                rates[k].append(rate)
                cpus[k].append(cpu)
            load.append(os.getloadavg()[0])
        pool.close()
        pool.join()

    info = _common.machine()
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    print(f"{info['date']} | {info['cpu']} | {info['cores']} cores | torch {info['torch']} | commit {info['commit']}")
    print(f"{a.images} JPEGs {a.width}x{a.height} (mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.1f} KiB), "
          f"tiles {a.tile} px up to {a.max_tiles}, batch {a.batch}, {a.workers} workers/processes, {a.repeats} rounds; "
          f"1-minute load average {', '.join(f'{x:.1f}' for x in load)} (start, after each round)")
    rows = [("uint8", "pipeline, uint8 batches as delivered (a GPU normalises them on the device)", "limit_uint8"),
            ("limit_uint8", "limit, decode_jpeg + tile_image_uint8", "limit_uint8"),
            ("pipeline", "pipeline + model_images in the main process (training on the CPU)", "limit"),
            ("float", "previous pipeline, float32 tiles from the workers", "limit"),
            ("limit", "limit, decode_jpeg + tile_image (normalised)", "limit")]
    print(_common.markdown_table(
        ["", "samples/s (median)", "rounds", "/ its limit", "CPU ms per sample (median)", "its limit's / its"],
        [[label, f"{med[k]:.1f}", ", ".join(f"{r:.1f}" for r in rates[k]), f"{med[k] / med[ref]:.3f}",
          f"{cpu[k] * 1e3:.2f}", f"{cpu[ref] / cpu[k]:.3f}"] for k, label, ref in rows if k in med and ref in med]))


if __name__ == "__main__":
    main()

"""Tiles cut straight into their slots (`cut_tiles`, `Tiled.resized`, `collate_images`) equal the earlier path:
pad the resized image onto its canvas, cut it, stack the tiles into a zero-filled batch."""
import itertools

import pytest
import torch
import webdataset as wds
from torchvision.transforms.v2 import functional as TF

from encoders.vision.transform import (
    best_canvas, cut_tiles, fit_size, resize_to_canvas, stack_images, supported_aspect_ratios, tile_image_uint8,
)
from mm_llama.data.batch_buffers import BufferPool, shared_storage, take_lent
from mm_llama.data.config import DataConfig
from mm_llama.data.demo_vision import jpeg_bytes
from mm_llama.data.image_text import ImageCounters, ImageDecoder, ImageLoader, Tiled, collate_images, decode_image


def padded_then_cut(image: torch.Tensor, tile_size: int, max_num_tiles: int):
    """The earlier `tile_image_uint8`: resize, pad the whole canvas, cut it with a permuted copy."""
    h, w = image.shape[-2:]
    rows, cols = best_canvas(h, w, tile_size, max_num_tiles)
    new_h, new_w = fit_size(h, w, rows * tile_size, cols * tile_size, tile_size)
    x = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    x = TF.pad(x, [0, 0, cols * tile_size - new_w, rows * tile_size - new_h], fill=0)
    tiles = x.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, 3, tile_size, tile_size), (rows, cols)


def pixels(h: int, w: int, seed: int, channels_last: bool) -> torch.Tensor:
    x = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    # decode_jpeg returns [3, H, W] laid out as H, W, 3 in memory; PIL-made tensors are plain [3, H, W]
    return x.permute(1, 2, 0).contiguous().permute(2, 0, 1) if channels_last else x


SIZES = list(itertools.product([1, 2, 13, 27, 28, 29, 55, 56, 57, 111, 168, 200], [1, 3, 28, 31, 84, 85, 301, 500]))


@pytest.mark.parametrize("tile_size,max_tiles", [(28, 1), (28, 4), (14, 6), (56, 9)])
def test_tiles_cut_in_place_equal_the_padded_canvas_cut(tile_size, max_tiles):
    grids = set()
    for i, (h, w) in enumerate(SIZES):
        for channels_last in (False, True):
            image = pixels(h, w, i, channels_last)
            want, grid = padded_then_cut(image, tile_size, max_tiles)
            tiles, got_grid = tile_image_uint8(image, tile_size, max_tiles)
            assert got_grid == grid and tiles.shape == want.shape and torch.equal(tiles, want), (h, w, channels_last)
            slots = torch.full((max_tiles + 1, 3, tile_size, tile_size), 7, dtype=torch.uint8)  # stale pixels
            resized, _ = resize_to_canvas(image, tile_size, max_tiles)
            cut = cut_tiles(resized, grid, tile_size, out=slots)
            assert cut.data_ptr() == slots.data_ptr() and torch.equal(cut, want)
            assert (slots[grid[0] * grid[1] :] == 7).all()  # slots past the image's are left alone
            grids.add(grid)
    assert (1, 1) in grids and any(r * c == max_tiles for r, c in grids)  # 1-tile and max-tile grids are covered
    if max_tiles > 1:
        assert {(1, 2), (2, 1)} <= grids


def test_cut_tiles_rejects_an_image_larger_than_its_canvas():
    with pytest.raises(ValueError, match="does not fit a 1x2 grid"):
        cut_tiles(torch.zeros(3, 29, 40, dtype=torch.uint8), (1, 2), 28)


def _examples(tile_size: int, max_tiles: int, resized: bool):
    """Examples of one or two images (or three), every grid up to `max_tiles` among them."""
    images = []
    for i, (r, c) in enumerate(supported_aspect_ratios(max_tiles)):
        h, w = r * tile_size - 3 * i, c * tile_size + i  # odd sizes whose canvas is that grid
        image = pixels(max(h, 1), w, 100 + i, channels_last=i % 2 == 0)
        if resized:
            images.append(Tiled.resized(*resize_to_canvas(image, tile_size, max_tiles), tile_size))
        else:
            images.append(Tiled(*padded_then_cut(image, tile_size, max_tiles)))
    return [images[0], images[1:3], images[3:6], [images[-1]], images[-1]] if len(images) > 3 else images


@pytest.mark.parametrize("tile_size,max_tiles", [(28, 1), (28, 4), (14, 6)])
def test_collate_of_resized_images_equals_stacking_the_tiles(tile_size, max_tiles):
    old = _examples(tile_size, max_tiles, resized=False)
    new = _examples(tile_size, max_tiles, resized=True)
    batch = [[(t.tiles, t.grid) for t in (x if isinstance(x, list) else [x])] for x in old]
    want, want_ratios = stack_images(batch, max_tiles)
    images, ratios = collate_images(new, max_tiles)
    assert images.dtype == torch.uint8 and torch.equal(images, want) and torch.equal(ratios, want_ratios)
    assert torch.equal(collate_images(old, max_tiles)[0], want)  # tiles and resized images mix alike
    flat = [t for x in new for t in (x if isinstance(x, list) else [x])]
    assert all(torch.equal(a.tiles, b.tiles) for a, b in zip(flat, (t for x in old for t in (x if isinstance(x, list)
                                                                                               else [x]))))


def test_collate_rejects_more_tiles_than_slots_and_tiles_that_miss_their_grid():
    image = Tiled.resized(*resize_to_canvas(pixels(28, 84, 0, False), 28, 4), 28)
    assert image.grid == (1, 3)
    with pytest.raises(ValueError, match="example 1 image 0: 3 tiles for a 1x3 grid"):
        collate_images([Tiled(torch.zeros(1, 3, 28, 28, dtype=torch.uint8), (1, 1)), image], 2)
    with pytest.raises(ValueError, match="for a 1x2 grid"):
        Tiled(torch.zeros(3, 3, 28, 28), (1, 2))
    with pytest.raises(ValueError, match="at least one image"):
        collate_images([[], []], 2)


class _CollateResizedInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        images, ratios = collate_images(_examples(28, 4, resized=True), 4)
        yield images, ratios, images.is_shared()


def test_collate_of_resized_images_in_a_worker_is_shared_and_equal():
    want, want_ratios = collate_images(_examples(28, 4, resized=False), 4)
    loader = torch.utils.data.DataLoader(_CollateResizedInWorker(), batch_size=None, num_workers=1)
    [(images, ratios, shared)] = list(loader)
    assert shared and torch.equal(images, want) and torch.equal(ratios, want_ratios)


def test_uint8_decoder_defers_the_cut_to_the_batch():
    from PIL import Image

    picture = Image.fromarray(pixels(50, 130, 3, False).permute(1, 2, 0).numpy())
    data = jpeg_bytes(picture)
    counters = ImageCounters()
    tiled = ImageDecoder(28, 4, uint8=True).tile(data, "jpg", "x", counters)
    want, grid = padded_then_cut(decode_image(data, "jpg"), 28, 4)
    assert counters.decoded == 1 and tiled.grid == grid and tiled.dtype == torch.uint8
    assert "resized" in repr(tiled) and torch.equal(tiled.tiles, want)
    images, _ = collate_images([tiled], 4)
    assert torch.equal(images[0, 0, : want.shape[0]], want) and not images[0, 0, want.shape[0] :].any()


# ------------------------------------------------------------------------ reused shared-memory batch buffers

class _PooledBatches(torch.utils.data.IterableDataset):
    """What `ImageLoader`'s workers do: batches from `collate_images` in the pool's buffers, sent with their leases."""

    def __init__(self, pool: BufferPool):
        self.pool = pool

    def __iter__(self):
        self.pool.enter(torch.utils.data.get_worker_info().id)
        for i in range(12):
            value = Tiled(torch.full((1, 3, 28, 28), i, dtype=torch.uint8), (1, 1))
            images, _ = collate_images([value, value], 1)
            yield i, images, take_lent()


def _pooled(pool: BufferPool, keep: bool):
    """(index, images, buffer address) per batch; `keep`: hold every batch, else drop each before the next."""
    loader = torch.utils.data.DataLoader(_PooledBatches(pool), batch_size=None, num_workers=1, prefetch_factor=2)
    kept, seen = [], []
    for i, images, lent in loader:
        pool.hold(lent)
        assert images.is_shared() and (images == i).all()  # nothing overwrote a batch while it was held
        seen.append(images.data_ptr() - lent[0][2].data_ptr() if lent else None)
        if keep:
            kept.append((i, images))
        del images, lent
        pool.release_unused()
        assert all((im == j).all() for j, im in kept)
    return seen, kept


def test_batch_buffers_are_reused_only_once_the_consumer_dropped_them():
    pool = BufferPool(workers=1, per_worker=4)
    seen, _ = _pooled(pool, keep=False)
    assert seen.count(0) >= 10  # batches built in the pool's buffers (a few may find none free yet)
    assert int(pool.flags.sum()) <= 4
    pool = BufferPool(workers=1, per_worker=3)
    seen, kept = _pooled(pool, keep=True)
    assert [i for i, _ in kept] == list(range(12)) and all((im == i).all() for i, im in kept)
    assert seen.count(0) == 3 and pool.flags.tolist() == [[1, 1, 1]]  # held: never freed, fresh buffers after
    del kept
    pool.release_unused()
    assert pool.flags.tolist() == [[0, 0, 0]]


def test_a_buffer_is_freed_when_its_last_view_goes_and_never_when_the_batch_did_not_reference_it():
    pool = BufferPool(workers=1, per_worker=2)
    pool.flags[0] = 1
    used, alone = torch.UntypedStorage(64), torch.UntypedStorage(64)
    batch = torch.empty(0, dtype=torch.uint8).set_(used)[:32].view(4, 8)
    pool.hold([(0, 0, used), (0, 1, alone)])  # `alone`: the batch holds a copy, or the storage was mapped twice
    view = batch[1]
    del batch
    pool.release_unused()
    assert pool.flags.tolist() == [[1, 1]]  # a view still reads buffer 0
    del view
    pool.release_unused()
    assert pool.flags.tolist() == [[0, 1]]


def test_shared_storage_outside_a_pool_is_a_new_buffer_each_time():
    a, b = shared_storage(100), shared_storage(100)
    assert a.is_shared() and b.is_shared() and a.data_ptr() != b.data_ptr() and take_lent() == []


def _write_shards(root, n: int):
    from mm_llama.data.demo_vision import make_scene, render

    with wds.TarWriter(str(root / "img-000000.tar")) as sink:
        for i in range(n):
            picture = render(make_scene(i, size=20 + 7 * (i % 9))).resize((20 + 5 * (i % 7), 20 + 7 * (i % 9)))
            sink.write({"__key__": f"k{i:04d}", "jpg": jpeg_bytes(picture), "txt": "x"})


def _collate(examples):
    return collate_images(examples, 4)


def test_loader_batches_held_by_the_consumer_stay_intact(tmp_path):
    _write_shards(tmp_path, 40)
    cfg = DataConfig(root=str(tmp_path), sources=[{"name": "img", "shards": "img-*.tar"}], num_workers=2)

    def batches(n: int):
        loader = ImageLoader(cfg, lambda sample, image, seed: image, _collate, batch_size=2, seed=3, tile_size=28,
                             max_tiles=4, uint8=True)
        it = iter(loader)
        return it, [next(it) for _ in range(n)]

    it, copies = batches(0)
    copies = [(images.clone(), ratios) for images, ratios in (next(it) for _ in range(24))]  # dropped at once
    del it
    it, held = batches(24)  # all held: the workers must find other buffers
    del it
    assert len({images.data_ptr() for images, _ in held}) == 24
    for (want, want_ratios), (images, ratios) in zip(copies, held):
        assert images.dtype == torch.uint8 and torch.equal(images, want) and torch.equal(ratios, want_ratios)

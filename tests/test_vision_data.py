"""Demo images, image decoding with corrupt-image accounting, the resumable image loader, `data pack image`."""
import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mm_llama.data.config import DataConfig
from mm_llama.data.demo_vision import (
    COLOURS, QUADRANTS, caption, demo_scenes, jpeg_bytes, make_scene, questions, render, scene_seed, scene_signature,
    write_image,
)
from encoders.vision.transform import stack_images, tile_image_uint8
from mm_llama.data.image_text import ImageError, ImageLoader, Tiled, collate_images, decode_image, heldout_examples
from mm_llama.data.pack_vision import pack_image


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width × height` but holds one tiny IDAT: a decompression-bomb header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------- demo images


def test_scene_is_a_pure_function_of_its_seed():
    a, b = make_scene(scene_seed("train", 7)), make_scene(scene_seed("train", 7))
    assert a == b and jpeg_bytes(render(a)) == jpeg_bytes(render(b))
    assert make_scene(scene_seed("train", 8)) != a


@pytest.mark.parametrize("index", range(12))
def test_answers_are_read_from_the_pixels(index):
    scene = make_scene(scene_seed("train", index))
    pixels = np.asarray(render(scene)).astype(int)
    for s in scene.shapes:  # the shape's colour at its centre, the background at the image centre
        assert np.abs(pixels[round(s.cy), round(s.cx)] - COLOURS[s.colour]).max() <= 1
        assert (s.cx >= scene.size / 2) == (s.quadrant % 2 == 1) and (s.cy >= scene.size / 2) == (s.quadrant >= 2)
    assert list(pixels[scene.size // 2, scene.size // 2]) == list(scene.background)
    qa = {q["type"]: q["answer"] for q in questions(scene)}
    assert qa["colour"] == scene.colour and qa["shape"] == scene.kind
    assert qa["count"] == ("one", "two", "three", "four")[len(scene.shapes) - 1]
    assert ("position" in qa) == (len(scene.shapes) == 1)
    if len(scene.shapes) == 1:
        assert qa["position"] == QUADRANTS[scene.shapes[0].quadrant]
        assert caption(scene) == f"a {scene.colour} {scene.kind} in the {qa['position']}"


def test_shapes_are_told_apart_by_their_pixels():
    """Circle, square and triangle of one size cover clearly different areas."""
    areas = {}
    for kind in ("circle", "square", "triangle"):
        base = make_scene(scene_seed("train", 0))
        shape = base.shapes[0].__class__(kind, "red", 0, 20.0, 20.0, 12.0)
        scene = base.__class__((shape,), (0, 0, 0), 84)
        areas[kind] = int((np.asarray(render(scene))[..., 0] > 100).sum())
    assert areas["triangle"] < 0.6 * areas["circle"] and abs(areas["square"] - areas["circle"]) < 0.25 * areas["circle"]


def test_heldout_split_shares_no_layout_with_training():
    train, val = demo_scenes(300, 60)
    assert len(val) == 60 and not {scene_signature(s) for s in val} & {scene_signature(s) for s in train}


def test_write_image_is_deterministic_and_readable(tmp_path):
    a = write_image(tmp_path / "a", n_train=16, n_val=4, n_documents=5)
    write_image(tmp_path / "b", n_train=16, n_val=4, n_documents=5)
    assert a.counts == {"train_images": 16, "val_images": 4, "train_shards": 8, "train_documents": 5}
    assert sorted(f.name for f in a.files) == sorted([f"train-{i:06d}.tar" for i in range(8)] + ["val-000000.tar"]
                                                     + [f"documents-{i:06d}.tar" for i in range(4)])
    for f in a.files:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
    samples = list(wds.WebDataset(str(tmp_path / "a" / "image" / "val-000000.tar"), shardshuffle=False))
    assert len(samples) == 4 and {"jpg", "txt", "json"} <= set(samples[0])
    meta = __import__("json").loads(samples[0]["json"])
    assert meta["caption"] == samples[0]["txt"].decode() and meta["qa"][0]["type"] == "colour"


# ------------------------------------------------------------------------------------------ decoding


def test_decode_matches_reference_decoders():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)
    assert torch.equal(decode_image(png_bytes(array), "png"), torch.from_numpy(array).permute(2, 0, 1))
    jpg = jpeg_bytes(Image.fromarray(array))
    from torchvision.io import decode_jpeg

    assert torch.equal(decode_image(jpg, "jpg"), decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8)))
    gray = png_bytes(array[..., 0])  # one channel comes back as RGB
    assert decode_image(gray, "png").shape == (3, 30, 41)


@pytest.mark.parametrize("data, extension, reason", [
    (b"", "jpg", "empty"),
    (None, "jpg", "truncated"),  # half a JPEG
    ("png", "jpg", "wrong_extension"),
    (b"<html>not an image</html>", "jpg", "undecodable"),
    ("bomb", "png", "too_large"),
])
def test_decode_names_the_reason(data, extension, reason):
    array = np.full((64, 64, 3), 90, np.uint8)
    if data is None:
        full = jpeg_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
        data = full[: len(full) // 2]
    elif data == "png":
        data = png_bytes(array)
    elif data == "bomb":
        data = png_header_only(30000, 30000)
    with pytest.raises(ImageError) as e:
        decode_image(data, extension)
    assert e.value.reason == reason


# -------------------------------------------------------------------------------------------- loader


def _make_examples(sample, image, seed):
    return (sample["__key__"], image.grid, float(image.tiles.sum()), seed)


def _collate(examples):
    return examples


def _shards(tmp_path, n_shards=3, per_shard=5, corrupt=True):
    good = jpeg_bytes(render(make_scene(1)))
    for s in range(n_shards):
        with wds.TarWriter(str(tmp_path / f"img-{s:06d}.tar")) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"s{s}i{i}", "jpg": jpeg_bytes(render(make_scene(s * 100 + i))), "txt": "x"})
            if corrupt and s == 0:
                sink.write({"__key__": "empty", "jpg": b"", "txt": "x"})
                sink.write({"__key__": "cut", "jpg": good[: len(good) // 2], "txt": "x"})
                sink.write({"__key__": "lying", "jpg": png_bytes(np.zeros((8, 8, 3), np.uint8)), "txt": "x"})
                sink.write({"__key__": "notimage", "txt": "x"})
    return DataConfig(root=str(tmp_path), sources=[{"name": "img", "shards": "img-*.tar"}], shuffle_buffer=4)


def _loader(cfg, **kw):
    return ImageLoader(cfg, _make_examples, _collate, batch_size=3, seed=5, tile_size=28, max_tiles=2, **kw)


def test_loader_counts_every_corrupt_image_by_reason(tmp_path):
    cfg = _shards(tmp_path)
    loader = _loader(cfg)
    batches = iter(loader)
    keys = [e[0] for _ in range(5) for e in next(batches)]  # one epoch: 15 good samples
    assert sorted(keys) == sorted(f"s{s}i{i}" for s in range(3) for i in range(5))
    stats = loader.stats()
    assert stats["skipped_images"] == {"empty": 1, "truncated": 1, "wrong_extension": 1, "no_image": 1}
    assert stats["skipped_samples"] == 4 and stats["decoded_images"] == 15 and stats["examples"] == 15


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resumes_exactly(tmp_path, workers):
    cfg = _shards(tmp_path, n_shards=4, corrupt=False).model_copy(update={"num_workers": workers})
    reference = iter(_loader(cfg))
    expected = [next(reference) for _ in range(9)]
    first = _loader(cfg)
    it = iter(first)
    got = [next(it) for _ in range(4)]
    state = first.state_dict()
    del it
    second = _loader(cfg)
    second.load_state_dict(torch.load(_roundtrip(tmp_path, state), weights_only=True))
    it = iter(second)
    got += [next(it) for _ in range(5)]
    assert got == expected
    assert second.stats()["examples"] == 27


def _roundtrip(tmp_path, state):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_single_shard_resumed_at_its_end_continues(tmp_path):
    cfg = _shards(tmp_path, n_shards=1, per_shard=3, corrupt=False)
    loader = _loader(cfg)
    next(iter(loader))  # exactly the whole shard
    again = _loader(cfg)
    again.load_state_dict(loader.state_dict())
    assert len(next(iter(again))) == 3


def test_loader_state_from_other_settings_is_refused(tmp_path):
    cfg = _shards(tmp_path, corrupt=False)
    state = _loader(cfg).state_dict()
    other = ImageLoader(cfg, _make_examples, _collate, batch_size=3, seed=6, tile_size=28, max_tiles=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_heldout_reads_in_order_once(tmp_path):
    cfg = _shards(tmp_path, n_shards=2, per_shard=3, corrupt=False)
    cfg = DataConfig(root=cfg.root, sources=cfg.sources, heldout=[{"name": "v", "shards": "img-000001.tar"}])
    examples, images = heldout_examples(cfg, _make_examples, tile_size=28, max_tiles=2, seed=0, limit=10)
    assert [e[0] for e in examples] == ["s1i0", "s1i1", "s1i2"] and images.decoded == 3


def test_all_images_corrupt_is_an_error(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad-000000.tar")) as sink:
        sink.write({"__key__": "a", "jpg": b"", "txt": "x"})
    cfg = DataConfig(root=str(tmp_path), sources=[{"name": "bad", "shards": "bad-*.tar"}])
    with pytest.raises(ValueError, match="none of its 1 shards gives a usable image"):
        next(iter(_loader(cfg)))


# ------------------------------------------------------------------------------------------ packing


def _tiled_batch() -> list[Tiled | list[Tiled]]:
    """Examples with one or two images of 1, 2 or 4 tiles (uint8), as the loader's workers make them."""
    sizes = [(30, 80), (70, 70), (20, 20), (90, 40)]
    tiles = [Tiled(*tile_image_uint8(render(make_scene(i, size=max(h, w))).resize((w, h)), 28, 4))
             for i, (h, w) in enumerate(sizes)]
    return [tiles[0], [tiles[1], tiles[2]], tiles[3]]


def test_stack_images_into_a_given_tensor_equals_a_new_one():
    batch = [[(t.tiles, t.grid) for t in (x if isinstance(x, list) else [x])] for x in _tiled_batch()]
    images, ratios = stack_images(batch, 4)
    assert images.shape == (3, 2, 4, 3, 28, 28) and images.dtype == torch.uint8
    assert ratios.tolist() == [[list(batch[0][0][1]), [0, 0]], [list(batch[1][0][1]), list(batch[1][1][1])],
                               [list(batch[2][0][1]), [0, 0]]]
    out = torch.full(images.shape, 255, dtype=torch.uint8)  # stale pixels must not survive in empty slots
    filled, ratios_out = stack_images(batch, 4, out=out)
    assert filled.data_ptr() == out.data_ptr() and torch.equal(filled, images) and torch.equal(ratios_out, ratios)
    with pytest.raises(ValueError, match="the batch needs"):
        stack_images(batch, 4, out=torch.zeros(3, 2, 4, 3, 28, 27, dtype=torch.uint8))


class _CollateInWorker(torch.utils.data.IterableDataset):
    def __iter__(self):
        images, ratios = collate_images(_tiled_batch(), 4)
        yield images, ratios, images.is_shared()


def test_collate_images_in_a_worker_builds_the_batch_in_shared_memory():
    images, ratios = collate_images(_tiled_batch(), 4)
    assert not images.is_shared()
    loader = torch.utils.data.DataLoader(_CollateInWorker(), batch_size=None, num_workers=1)
    [(worker_images, worker_ratios, shared)] = list(loader)
    assert shared and torch.equal(worker_images, images) and torch.equal(worker_ratios, ratios)


def test_pack_image_keeps_good_images_and_counts_the_rest(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(png_bytes(np.zeros((10, 10, 3), np.uint8)))  # a PNG named .jpg
    (folder / "c.jpg").write_bytes(b"")
    (folder / "d.png").write_bytes(png_header_only(30000, 30000))
    (tmp_path / "caps.tsv").write_text("image\tcaption\tquestion\tanswer\ttype\n"
                                       "a.jpg\ta grey field\tWhat colour?\tgrey\tcolour\n"
                                       "b.jpg\tblack\t\t\t\nc.jpg\tnothing\t\t\t\nd.png\tbomb\t\t\t\nmissing.jpg\tx\t\t\t\n"
                                       "a.jpg\t\t\t\t\n")
    report = pack_image(folder, tmp_path / "out", tmp_path / "caps.tsv")
    assert report.images == 2 and report.renamed == 1
    assert report.skipped == {"empty": 1, "too_large": 1, "missing_image": 1, "no_caption": 1}
    samples = list(wds.WebDataset(str(report.shards[0]), shardshuffle=False))
    assert "jpg" in samples[0] and "png" in samples[1]  # stored under the real format
    meta = __import__("json").loads(samples[0]["json"])
    assert meta["qa"] == [{"type": "colour", "question": "What colour?", "answer": "grey"}]
    assert samples[0]["txt"] == b"a grey field"


def test_pack_image_cli_and_bad_caption_file(tmp_path):
    from mm_llama.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "x.png")
    (folder / "x.txt").write_text("a black square")
    assert main(["data", "pack", "image", "--images", str(folder), "--out", str(tmp_path / "out")]) == 0
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert sorted(m.name for m in tar.getmembers()) == ["000000000000.json", "000000000000.png", "000000000000.txt"]
    (tmp_path / "bad.tsv").write_text("picture\tcaption\nx.png\thi\n")
    with pytest.raises(ValueError, match="bad.tsv: the header row must name an 'image' column"):
        pack_image(folder, tmp_path / "o2", tmp_path / "bad.tsv")

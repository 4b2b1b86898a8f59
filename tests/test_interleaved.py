"""Interleaved image-text documents: `data pack interleaved`, the document loader and token layout, the vision stage
on documents; and the uint8 tile path (workers ship uint8, normalised where used, equal to the float path)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from adapters.cross_attention import vision_mask
from encoders.vision.transform import (
    CLIP_MEAN, CLIP_STD, best_canvas, fit_size, normalize_images, stack_images, tile_image, tile_image_uint8,
)
from mm_llama.data.config import DataConfig
from mm_llama.data.demo_vision import jpeg_bytes, make_scene, render
from mm_llama.data.image_text import (
    Document, DocumentDecoder, DocumentSources, ImageCounters, ImageDecoder, ImageLoader, Tiled, collate_images,
    encode_document, model_images,
)
from mm_llama.data.pack_vision import pack_interleaved
from mm_llama.data.text_stream import SkipSample

RANKS = 300


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def solid(value: int, h: int = 12, w: int = 12) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def members(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from mm_llama.data.demo_vision import caption, demo_scenes
    from mm_llama.text import train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train, _ = demo_scenes(200, 1)
    words = [caption(s) for s in train] + ["Picture 1 of 2: What colour is the shape? How many? Where is it?"] * 5
    train_tokenizer(words, RANKS, path)
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    from mm_llama.text import load_tokenizer

    return load_tokenizer(tok_path)


# ------------------------------------------------------------------------------------------------ packing


def test_pack_jsonl_in_obelics_layout_writes_exact_members(tmp_path):
    (tmp_path / "pics").mkdir()
    Image.fromarray(solid(200)).save(tmp_path / "pics" / "a.jpg")
    (tmp_path / "pics" / "b.jpg").write_bytes(png_bytes(solid(10)))  # a PNG named .jpg: stored as png
    Image.fromarray(solid(90)).save(tmp_path / "pics" / "c.gif")  # GIFs are stored as PNG
    good = jpeg_bytes(Image.fromarray(solid(50, 40, 40)))
    (tmp_path / "pics" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated: left out, counted
    rows = [
        {"texts": ["First a grey one.", None, "Then a dark one.", None, "The end."],
         "images": [None, "pics/a.jpg", None, "pics/b.jpg", None], "url": "https://example.org/1", "extra": 1},
        {"texts": [None, "Broken then gif:", None, None], "images": ["pics/cut.jpg", None, "pics/c.gif", "pics/a.jpg"]},
        {"texts": ["only text"], "images": [None]},
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    report = pack_interleaved([tmp_path / "docs.jsonl"], tmp_path / "out")
    assert (report.documents, report.images, report.renamed) == (2, 4, 1)
    assert report.skipped == {"truncated": 1, "no_image": 1}
    got = members(tmp_path / "out" / "train-000000.tar")
    assert sorted(got) == ["000000000000.img0.jpg", "000000000000.img1.png", "000000000000.json",
                           "000000000001.img0.png", "000000000001.img1.jpg", "000000000001.json"]
    assert got["000000000000.img0.jpg"] == (tmp_path / "pics" / "a.jpg").read_bytes()
    first = json.loads(got["000000000000.json"])
    assert first == {"content": [{"type": "text", "text": "First a grey one."}, {"type": "image", "member": "img0.jpg"},
                                 {"type": "text", "text": "Then a dark one."}, {"type": "image", "member": "img1.png"},
                                 {"type": "text", "text": "The end."}],
                     "source": f"{tmp_path / 'docs.jsonl'}:1", "url": "https://example.org/1"}
    second = json.loads(got["000000000001.json"])["content"]
    assert second == [{"type": "text", "text": "Broken then gif:"}, {"type": "image", "member": "img0.png"},
                      {"type": "image", "member": "img1.jpg"}]


def test_pack_markdown_links_relative_to_the_file(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    Image.fromarray(solid(30)).save(tmp_path / "docs" / "sub" / "red dot.png")
    Image.fromarray(solid(60)).save(tmp_path / "shared" / "blue.jpg")
    (tmp_path / "docs" / "sub" / "page.md").write_text(
        "# Shapes\n\nA red dot:\n\n![a dot](red%20dot.png)\n\nand a blue one ![](<../../shared/blue.jpg> \"title\") here.\n")
    (tmp_path / "docs" / "plain.md").write_text("no pictures at all\n")
    report = pack_interleaved([tmp_path / "docs"], tmp_path / "out", prefix="md")
    assert report.documents == 1 and report.skipped == {"no_image": 1}
    got = members(tmp_path / "out" / "md-000000.tar")
    assert sorted(got) == ["000000000000.img0.png", "000000000000.img1.jpg", "000000000000.json"]
    assert got["000000000000.img1.jpg"] == (tmp_path / "shared" / "blue.jpg").read_bytes()
    meta = json.loads(got["000000000000.json"])
    assert meta["content"] == [{"type": "text", "text": "# Shapes\n\nA red dot:\n\n"},
                               {"type": "image", "member": "img0.png"},
                               {"type": "text", "text": "\n\nand a blue one "}, {"type": "image", "member": "img1.jpg"},
                               {"type": "text", "text": " here."}]
    assert meta["source"] == str(tmp_path / "docs" / "sub" / "page.md")


def test_missing_or_remote_image_is_an_error_naming_file_and_line(tmp_path, capsys):
    Image.fromarray(solid(1)).save(tmp_path / "ok.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"texts": ["x", None], "images": [None, "ok.png"]}) + "\n"
                                      + json.dumps({"texts": ["x", None], "images": [None, "nope.jpg"]}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"d\.jsonl:2: image nope\.jpg not found"):
        pack_interleaved([tmp_path / "d.jsonl"], tmp_path / "o1")
    (tmp_path / "m.md").write_text("one\n\ntwo ![](ok.png)\nthree\n![](gone/x.png)\n")
    with pytest.raises(FileNotFoundError, match=r"m\.md:5: image gone/x\.png not found"):
        pack_interleaved([tmp_path / "m.md"], tmp_path / "o2")
    (tmp_path / "r.md").write_text("![](https://example.org/a.png)\n")
    with pytest.raises(ValueError, match=r"r\.md:1: https://example.org/a.png is a remote image"):
        pack_interleaved([tmp_path / "r.md"], tmp_path / "o3")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"texts": ["a", "b"], "images": [None, "ok.png"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: at index 1 exactly one of texts\[1\]"):
        pack_interleaved([tmp_path / "bad.jsonl"], tmp_path / "o4")
    from mm_llama.cli import main

    assert main(["data", "pack", "interleaved", "--input", str(tmp_path / "m.md"), "--out", str(tmp_path / "o5")]) == 1
    assert "m.md:5: image gone/x.png not found" in capsys.readouterr().err
    (tmp_path / "m.md").write_text("two ![](ok.png)\n")
    assert main(["data", "pack", "interleaved", "--input", str(tmp_path / "m.md"), "--out", str(tmp_path / "o6")]) == 0
    assert "1 documents, 1 images in 1 shards" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- loading and tokens


def tiled(value: int, grid=(1, 1)) -> Tiled:
    return Tiled(torch.full((grid[0] * grid[1], 3, 28, 28), value, dtype=torch.uint8), grid)


def test_token_layout_labels_and_vision_mask(tok):
    from mm_llama.train.tasks.vision_lm import CollateChat, DocumentExamples

    doc = Document(["Picture 1 of 2: ", tiled(1), tiled(2, (1, 2)), " A red circle. ", tiled(3), " Two blue squares."])
    example = DocumentExamples(tok, 64)({"__key__": "k"}, doc, 0)
    enc = [tok.encode(t, bos=False, eos=False) for t in ("Picture 1 of 2: ", " A red circle. ", " Two blue squares.")]
    img = tok.image_id
    assert example.tokens == [tok.bos_id, *enc[0], img, img, *enc[1], img, *enc[2], tok.eos_id]
    assert example.loss_mask == [t not in (tok.bos_id, img) for t in example.tokens]
    assert [int(m.tiles[0, 0, 0, 0]) for m in example.media] == [1, 2, 3]  # images in reading order

    batch = CollateChat(tok.pad_id, 2)([example])
    ids = torch.tensor(example.tokens)
    assert torch.equal(batch.tokens[0], ids[:-1])
    expected = torch.where((ids[1:] == img) | (ids[1:] == tok.bos_id), -100, ids[1:])
    assert torch.equal(batch.labels[0], expected)  # every text token and eos is a target; image tokens are not
    assert batch.images.shape == (1, 3, 2, 3, 28, 28) and batch.aspect_ratios[0].tolist() == [[1, 1], [1, 2], [1, 1]]

    mask = vision_mask(batch.tokens, img, batch.aspect_ratios, 2)[0]  # [seq, image, tile]
    first, third = 1 + len(enc[0]), 1 + len(enc[0]) + 2 + len(enc[1])
    for t in range(batch.tokens.shape[1]):
        sees = [j for j in range(3) if mask[t, j].any()]
        # an image is seen from its own token; two in a row are both seen until the next image token
        assert sees == ([] if t < first else [0] if t == first else [0, 1] if t < third else [2]), t
    assert mask[first + 1, 0].tolist() == [True, False] and mask[first + 1, 1].tolist() == [True, True]  # real tiles


def test_max_images_cuts_the_document_and_counts_it(tok):
    data = {f"img{i}.png": png_bytes(solid(40 * i)) for i in range(3)}
    content = [{"type": "text", "text": "a "}, {"type": "image", "member": "img0.png"}, {"type": "text", "text": " b "},
               {"type": "image", "member": "img1.png"}, {"type": "text", "text": " c "},
               {"type": "image", "member": "img2.png"}, {"type": "text", "text": " d"}]
    sample = {"__key__": "k", "json": json.dumps({"content": content}).encode(), **data}
    counters = ImageCounters()
    doc = DocumentDecoder(ImageDecoder(28, 2, uint8=True), max_images=2)(sample, counters)
    assert [p if isinstance(p, str) else "IMG" for p in doc.parts] == ["a ", "IMG", " b ", "IMG", " c "]
    assert counters.truncated == 1 and counters.decoded == 2
    assert [int(t.tiles[0, 0, 0, 0]) for t in doc.images] == [0, 40]
    assert DocumentDecoder(ImageDecoder(28, 2), max_images=3)(sample, counters).images[2].tiles.dtype == torch.float32

    # a sequence cut drops the images past it; none left -> skipped
    tokens, mask, images = encode_document(doc, tok, 3 + len(tok.encode("a ", bos=False, eos=False)))
    assert tokens.count(tok.image_id) == 1 and len(images) == 1 and tokens[-1] != tok.eos_id
    with pytest.raises(SkipSample, match="no <\\|image\\|>"):
        encode_document(doc, tok, 2)


def document_shard(path, docs):
    with wds.TarWriter(str(path)) as sink:
        for key, content, media in docs:
            sink.write({"__key__": key, "json": {"content": content}, **media})


def _doc_examples(sample, document, seed):
    return (sample["__key__"], len(document.images))


def _pair_examples(sample, image, seed):
    return (sample["__key__"], "pair")


def test_loader_counts_corrupt_and_missing_images_and_mixes_pairs(tmp_path):
    from mm_llama.data.shards import DataError

    good = jpeg_bytes(render(make_scene(3)))
    text, image = {"type": "text", "text": "x "}, lambda m: {"type": "image", "member": m}
    document_shard(tmp_path / "docs-000000.tar", [
        ("allbad", [text, image("img0.jpg")], {"img0.jpg": b""}),
        ("noparts", [], {}),
        ("ok", [text, image("img0.jpg"), text, image("img1.jpg")], {"img0.jpg": good, "img1.jpg": good}),
        ("onebad", [text, image("img0.jpg"), image("img1.jpg")], {"img0.jpg": good[:200], "img1.jpg": good}),
        ("missing", [text, image("img0.jpg"), image("img5.jpg")], {"img0.jpg": good}),
    ])
    with wds.TarWriter(str(tmp_path / "pairs-000000.tar")) as sink:
        sink.write({"__key__": "pair", "jpg": good, "txt": "x"})
    docs = {"name": "docs", "shards": "docs-*.tar"}
    loader = ImageLoader(DataConfig(root=str(tmp_path), shuffle=False, sources=[docs]), _pair_examples, list,
                         batch_size=3, seed=0, tile_size=28, max_tiles=2,
                         documents=DocumentSources(("docs",), _doc_examples, 4))
    assert next(iter(loader)) == [("ok", 2), ("onebad", 1), ("missing", 1)]  # one pass over the shard, exactly
    stats = loader.stats()
    assert stats["skipped_images"] == {"empty": 1, "truncated": 1, "no_image": 1} and stats["decoded_images"] == 4
    assert stats["skipped_samples"] == 2  # allbad (its one image unusable) and noparts

    mixed = DataConfig(root=str(tmp_path), sources=[docs, {"name": "pairs", "shards": "pairs-*.tar"}])
    loader = ImageLoader(mixed, _pair_examples, list, batch_size=16, seed=0, tile_size=28, max_tiles=2,
                         documents=DocumentSources(("docs",), _doc_examples, 4))
    assert {k for k, _ in next(iter(loader))} == {"ok", "onebad", "missing", "pair"}
    with pytest.raises(ValueError, match=r"document sources \['nope'\] are not among data.sources"):
        ImageLoader(mixed, _pair_examples, list, batch_size=1, seed=0, tile_size=28, max_tiles=2,
                    documents=DocumentSources(("nope",), _doc_examples, 4))
    # a pair loader pointed at document shards finds no plain image member: counted, never misread as a pair
    pairs_only = ImageLoader(DataConfig(root=str(tmp_path), sources=[docs]), _pair_examples, list, batch_size=1,
                             seed=0, tile_size=28, max_tiles=2)
    with pytest.raises(DataError, match="none of its 1 shards gives a usable image sample"):
        next(iter(pairs_only))


# ------------------------------------------------------------------------------------ uint8 tiles


def previous_tile_image(image: torch.Tensor, tile_size: int, max_num_tiles: int):
    """`tile_image` as it was before the uint8 split: normalise the padded canvas, then cut it."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    rows, cols = best_canvas(h, w, tile_size, max_num_tiles)
    new_h, new_w = fit_size(h, w, rows * tile_size, cols * tile_size, tile_size)
    x = TF.resize(image, [new_h, new_w], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    x = TF.pad(x, [0, 0, cols * tile_size - new_w, rows * tile_size - new_h], fill=0)
    x = TF.normalize(x.float() / 255.0, list(CLIP_MEAN), list(CLIP_STD))
    tiles = x.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * cols, 3, tile_size, tile_size), (rows, cols)


def test_uint8_tiles_normalise_to_exactly_the_float_path():
    g = torch.Generator().manual_seed(0)
    sizes = [(20, 50), (90, 30), (28, 28), (61, 127), (5, 200)]
    pictures = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    batch_u8, batch_f = [], []
    for i, p in enumerate(pictures):
        u8, grid = tile_image_uint8(p, 28, 4)
        f, grid_f = tile_image(p, 28, 4)
        old, grid_old = previous_tile_image(p, 28, 4)
        assert u8.dtype == torch.uint8 and grid == grid_f == grid_old
        assert torch.equal(f, old)  # tile_image's output did not change
        batch_u8.append([(u8, grid)] * (1 + i % 2))  # rows with one and two images: empty slots in the batch
        batch_f.append([(f, grid)] * (1 + i % 2))
    images_u8, ratios = stack_images(batch_u8, 4)
    images_f, ratios_f = stack_images(batch_f, 4)
    assert images_u8.dtype == torch.uint8 and torch.equal(ratios, ratios_f)
    assert images_u8.nbytes * 4 == images_f.nbytes
    out = normalize_images(images_u8, ratios)
    assert torch.equal(out, images_f)  # bit for bit, zero in every empty tile and image slot
    assert out.view(torch.int32).eq(images_f.view(torch.int32)).all()  # not even a -0.0 where +0.0 was
    assert model_images(images_f, ratios) is images_f and torch.equal(model_images(images_u8, ratios), images_f)


def test_uint8_loader_batches_equal_the_float_loader(tmp_path):
    with wds.TarWriter(str(tmp_path / "img-000000.tar")) as sink:
        for i in range(6):
            picture = Image.fromarray(np.asarray(render(make_scene(i, size=40 + 10 * i))))
            sink.write({"__key__": f"k{i}", "jpg": jpeg_bytes(picture), "txt": "x"})
    cfg = DataConfig(root=str(tmp_path), sources=[{"name": "img", "shards": "img-*.tar"}])

    def batch(uint8):
        loader = ImageLoader(cfg, lambda s, im, seed: im, lambda ex: collate_images(ex, 2), batch_size=6, seed=1,
                             tile_size=28, max_tiles=2, uint8=uint8)
        return next(iter(loader))

    (u8, ratios), (f, ratios_f) = batch(True), batch(False)
    assert u8.dtype == torch.uint8 and f.dtype == torch.float32 and torch.equal(ratios, ratios_f)
    assert torch.equal(model_images(u8, ratios), f)


# ----------------------------------------------------------------------------------- the vision stage


def test_vision_stage_trains_on_interleaved_documents(tmp_path, tok, tok_path):
    from safetensors.torch import load_file

    from mm_llama.config import ConfigError
    from mm_llama.config.load import CONFIG_ROOT, read_yaml, validate
    from mm_llama.config.stage import StageConfig
    from mm_llama.data.demo_vision import write_image
    from mm_llama.train.engine import train_stage
    from mm_llama.train.tasks import task_for

    write_image(tmp_path, n_train=24, n_val=4, n_documents=8)
    (tmp_path / "tokenizer.model").write_bytes(tok_path.read_bytes())
    data = read_yaml(CONFIG_ROOT / "stages" / "tiny" / "vision_adapter_interleaved.yaml")
    data["model"] = {"name": "t", "lm": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1,
                                         "vocab_size": RANKS + 256, "multiple_of": 16, "max_seq_len": 128},
                     "vision": {"encoder": {"tile_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 2,
                                            "max_num_tiles": 2, "intermediate_layers": [1], "n_global_layers": 1},
                                "n_cross_attention_layers": 1}}
    data["data"].update(root=str(tmp_path), num_workers=0)
    data["data"]["sources"][1]["weight"] = 2.0  # mostly documents, so both kinds are in the few batches
    data["run"].update(out_dir=str(tmp_path / "run"), checkpoint_every=3)
    data["train"].update(steps=3, micro_batch=4, eval_batches=1, eval_every=0)
    data["train"]["options"].pop("encoder_from")
    data.pop("init")
    cfg = validate(StageConfig, data, "interleaved")
    task = task_for(cfg)
    batches = iter(task.loader(cfg.train.seq_len, 4, 0, 1))
    seen = [next(batches) for _ in range(3)]
    assert any(b.images.shape[1] >= 2 for b in seen) and "document" in {k for b in seen for k in b.kinds}
    doc_rows = [(b, i) for b in seen for i, k in enumerate(b.kinds) if k == "document"]
    for b, i in doc_rows:  # one <|image|> per image slot in use
        assert int((b.tokens[i] == tok.image_id).sum()) == int((b.aspect_ratios[i, :, 0] > 0).sum())
    out = train_stage(cfg)
    weights = load_file(out / "final" / "model.safetensors")
    fresh = task.build_model()
    assert not torch.equal(weights["cross_attention.1.gate_attn"], fresh.cross_attention["1"].gate_attn.detach())
    assert torch.equal(weights["lm.layers.0.attention.wq.weight"], fresh.lm.layers[0].attention.wq.weight.detach())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r and r["loss"] is not None]) == 3

    data["train"]["options"]["documents"] = ["demo_image_val"]
    with pytest.raises(ConfigError, match=r"documents: \['demo_image_val'\] are not data.sources names.*held-out"):
        task_for(validate(StageConfig, data, "interleaved"))

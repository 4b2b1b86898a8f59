"""Image-text pairs: exact and perceptual near-duplicate removal, caption filters, CLIP similarity."""
import io
import json
import random

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from mm_llama.curate.config import ClipConfig, CurateConfig
from mm_llama.curate.images import NearDuplicateIndex, OpenClipSimilarity, build_similarity, perceptual_hash
from mm_llama.curate.runner import curate
from mm_llama.curate.shards import read_shard


def picture(seed, size=64):
    """A distinct picture: random 8×8 colour blocks, upsampled."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BILINEAR)


def encode(image, fmt="PNG", **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_near_duplicate_index_matches_brute_force():
    rng = random.Random(0)
    hashes = [rng.getrandbits(64) for _ in range(40)]
    hashes += [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in hashes[:20]]  # ≤ 2 bits away
    index = NearDuplicateIndex(64, max_distance=3)
    found = {i: index.add(i, h) for i, h in enumerate(hashes)}
    kept = []
    for i, h in enumerate(hashes):
        match = next((k for k in kept if bin(hashes[k] ^ h).count("1") <= 3), None)
        assert found[i] == match
        if match is None:
            kept.append(i)
    assert sum(v is not None for v in found.values()) == 20


def test_perceptual_hash_survives_resize_and_recompression():
    a = picture(1)
    near = Image.open(io.BytesIO(encode(a.resize((48, 48)), "JPEG", quality=70)))
    d_near = bin(perceptual_hash(a) ^ perceptual_hash(near)).count("1")
    d_other = bin(perceptual_hash(a) ^ perceptual_hash(picture(2))).count("1")
    assert d_near <= 4 < 20 <= d_other


class FlatSimilarity:
    """A plug-in similarity: 0 for a flat single-colour picture, 1 for anything else."""

    def similarity(self, images, captions):
        assert len(images) == len(captions)
        return [float(np.asarray(im).reshape(-1, 3).std(0).max() > 1.0) for im in images]


def solid(rgb):
    return Image.new("RGB", (32, 32), rgb)


def test_image_text_run(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    samples = [(f"p{i}", encode(picture(10 + i)), f"a picture number {i} in red") for i in range(8)]
    samples += [
        ("exact", samples[0][1], "the same bytes again in red"),
        ("near", encode(picture(11).resize((50, 50)), "JPEG", quality=60), "resized copy in red"),
        ("short", encode(picture(40)), ""),
        ("french", encode(picture(41)), "une belle image de la mer au coucher du soleil"),
        ("broken", b"not an image at all", "a caption in red"),
        ("mismatch", encode(solid((0, 0, 200))), "a caption saying red"),
    ]
    with wds.TarWriter(str(raw / "img-0.tar")) as w:
        for key, data, caption in samples[:7]:
            w.write({"__key__": key, "png": data, "txt": caption, "json": {}})
    with wds.TarWriter(str(raw / "img-1.tar")) as w:
        for key, data, caption in samples[7:]:
            w.write({"__key__": key, ("jpg" if key == "near" else "png"): data, "txt": caption, "json": {"k": key}})
    config = CurateConfig(
        kind="image_text", inputs=[str(raw / "img-*.tar")], output=str(tmp_path / "out"), workers=1,
        language={"languages": ["en", "fr", "de"]},
        images={"min_caption_words": 1, "caption_languages": ["en"],
                "clip": {"scorer": f"{__name__}:FlatSimilarity", "min_similarity": 0.5}},
    )
    report = curate(config)
    assert report["removed"] == {"image_exact_duplicate": 1, "image_near_duplicate": 1, "caption_length": 1,
                                 "caption_language": 1, "unreadable_image": 1, "clip_similarity": 1}
    kept = {s.key: s for p in sorted((tmp_path / "out").glob("*.tar")) for s in read_shard(p)}
    assert sorted(kept) == [f"p{i}" for i in range(8)]
    assert kept["p7"].members["png"] == samples[7][1] and kept["p7"].meta["clip_similarity"] == 1.0
    near = report["examples"]["image_near_duplicate"][0]
    assert near["key"] == "near" and "'p1'" in near["why"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip
    import torch

    root = tmp_path_factory.mktemp("clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / "curate-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(root / "curate-tiny-clip.json"))
    torch.manual_seed(0)
    model = open_clip.create_model("curate-tiny-clip")
    torch.save(model.state_dict(), root / "clip.pt")
    return root, model


def test_open_clip_similarity_is_cosine_of_embeddings(tiny_clip):
    import open_clip
    import torch

    root, model = tiny_clip
    scorer = build_similarity(ClipConfig(scorer="open_clip", options={
        "model": "curate-tiny-clip", "checkpoint": str(root / "clip.pt"), "model_config": str(root / "curate-tiny-clip.json")}))
    assert isinstance(scorer, OpenClipSimilarity)
    images, captions = [picture(1), picture(2)], ["a red picture", "something else entirely"]
    got = scorer.similarity(images, captions)
    _, _, preprocess = open_clip.create_model_and_transforms("curate-tiny-clip")
    with torch.no_grad():
        img = model.eval().encode_image(torch.stack([preprocess(i) for i in images]))
        txt = model.encode_text(open_clip.get_tokenizer("curate-tiny-clip")(captions))
        expected = torch.nn.functional.cosine_similarity(img, txt).tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    assert all(-1.0 <= g <= 1.0 for g in got)

"""Logit parity with `transformers.MllamaForConditionalGeneration` on the same (small, random) weights.

Covers an image at the start, text before an image in the middle, two images in one sample, a sample
with an empty image slot, tiles of 1×1, 1×2 and 2×1, and the processor's inputs mapped to ours
(pixel tiles, aspect-ratio ids, cross-attention mask, token ids).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from encoders.vision import CLIP_MEAN, CLIP_STD, stack_images, supported_aspect_ratios, tile_image
from mm_llama.checkpoint import CheckpointError
from mm_llama.checkpoint.mllama import build_mllama, load_mllama, tokens_from_hf
from mm_llama.model.multimodal import MultimodalModel

TOL = 1e-4
VOCAB, TILE, MAX_TILES = 128, 28, 2
HF_IMAGE = VOCAB  # transformers' <|image|> is the first row after the vocabulary
OUR_IMAGE = 120  # the in-vocabulary id our tokenizer would give <|image|>
VISION = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
              vision_output_dim=32 * 3, image_size=TILE, patch_size=14, max_num_tiles=MAX_TILES,
              intermediate_layers_indices=[1, 2], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
TEXT = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, cross_attention_layers=[1, 4], pad_token_id=0, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8})


@pytest.fixture(scope="module")
def hf_model():
    config = MllamaConfig(vision_config=VISION, text_config=TEXT, image_token_index=HF_IMAGE)
    config._attn_implementation = "eager"
    model = MllamaForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:  # every gate open, so each path shows in the logits
                p.copy_(0.4 + 0.5 * torch.rand(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def ours(hf, semantics="transformers") -> MultimodalModel:
    return build_mllama(hf.state_dict(), hf.config.to_dict(), "hf", semantics, image_token_id=OUR_IMAGE).eval()


def pictures():
    rng = np.random.default_rng(0)
    sizes = [(20, 50), (60, 25), (30, 30)]  # (h, w) → 1x2, 2x1, 1x1 canvases
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def processor():
    return MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=MAX_TILES,
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def hf_inputs(batch_ids: list[list[int]], batch_images):
    """transformers' processor outputs for these ids (with `HF_IMAGE`) and per-sample image lists."""
    enc = processor()(images=batch_images, return_tensors="pt")
    length = len(batch_ids[0])
    token_masks = [get_cross_attention_token_mask(ids, HF_IMAGE) for ids in batch_ids]
    dense = convert_sparse_cross_attention_mask_to_dense(token_masks, enc["num_tiles"], MAX_TILES, length)
    return dict(input_ids=torch.tensor(batch_ids), pixel_values=enc["pixel_values"],
                aspect_ratio_ids=enc["aspect_ratio_ids"], aspect_ratio_mask=enc["aspect_ratio_mask"],
                cross_attention_mask=torch.from_numpy(dense))


def our_inputs(model: MultimodalModel, batch_ids, batch_images):
    tiles = [[tile_image(im, TILE, MAX_TILES) for im in sample] for sample in batch_images]
    images, ratios = stack_images(tiles, MAX_TILES)
    tokens = tokens_from_hf(torch.tensor(batch_ids), HF_IMAGE, model.image_token_id)
    return tokens, images, ratios


def ids(*parts) -> list[int]:
    g = torch.Generator().manual_seed(len(parts))
    out = []
    for p in parts:
        out += [HF_IMAGE] if p == "img" else torch.randint(3, 100, (p,), generator=g).tolist()
    return out


CASES = {
    "image_first": ([ids("img", 11)], [[0]]),
    "text_then_image_mid": ([ids(5, "img", 6)], [[1]]),
    "two_images_and_empty_slot": ([ids("img", 4, "img", 6), ids(3, "img", 8)], [[0, 1], [2]]),
    "two_consecutive_images": ([ids(2, "img", "img", 8)], [[2, 0]]),
}


@pytest.mark.parametrize("case", CASES)
def test_processor_inputs_map_to_ours(hf_model, case):
    batch_ids, which = CASES[case]
    pics = pictures()
    batch_images = [[pics[i] for i in sample] for sample in which]
    ref = hf_inputs(batch_ids, batch_images)
    model = ours(hf_model)
    tokens, images, ratios = our_inputs(model, batch_ids, batch_images)
    # Tiles: the same resize/pad/normalise (both torchvision bilinear + antialias on uint8).
    assert images.shape == ref["pixel_values"].shape
    assert (images - ref["pixel_values"]).abs().max() <= 1e-5
    # (rows, cols) → transformers' 1-based aspect_ratio_id (0 = empty slot).
    assert torch.equal(model.vision.grid_index(ratios), ref["aspect_ratio_ids"])
    assert [tuple(r) for r in VISION["supported_aspect_ratios"]] == list(supported_aspect_ratios(MAX_TILES))
    # Our bool vision mask is transformers' cross_attention_mask.
    assert torch.equal(model.vision_mask(tokens, ratios), ref["cross_attention_mask"].bool())


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(hf_model, case):
    batch_ids, which = CASES[case]
    pics = pictures()
    batch_images = [[pics[i] for i in sample] for sample in which]
    ref_in = hf_inputs(batch_ids, batch_images)
    with torch.no_grad():
        ref = hf_model(**ref_in).logits
        model = ours(hf_model, "transformers")
        tokens, _, ratios = our_inputs(model, batch_ids, batch_images)
        got = model(tokens, images=ref_in["pixel_values"], aspect_ratios=ratios)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL


def test_text_only_matches_transformers(hf_model):
    batch = torch.tensor([ids(20)])
    with torch.no_grad():
        assert (ours(hf_model)(batch) - hf_model(input_ids=batch).logits).abs().max() <= TOL


def test_meta_semantics_differ_from_transformers_only_where_documented(hf_model):
    """Meta taps the input of vision block i and masks both branches of image-less rows; transformers
    5.x taps block i's output and leaks image signal into text before the first image."""
    batch_ids, which = CASES["text_then_image_mid"]
    pics = pictures()
    batch_images = [[pics[i] for i in sample] for sample in which]
    ref_in = hf_inputs(batch_ids, batch_images)
    meta = ours(hf_model, "meta")
    tokens, _, ratios = our_inputs(meta, batch_ids, batch_images)
    first = batch_ids[0].index(HF_IMAGE)
    other = {**ref_in, "pixel_values": ref_in["pixel_values"].flip(-1)}
    with torch.no_grad():
        ref, ref_other = hf_model(**ref_in).logits, hf_model(**other).logits
        got = meta(tokens, images=ref_in["pixel_values"], aspect_ratios=ratios)
        got_other = meta(tokens, images=other["pixel_values"], aspect_ratios=ratios)
        text_only = meta(tokens[:, :first])
    assert (got - ref).abs().max() > 1e-2  # if this fails, transformers changed one of the two behaviours
    # Ours: text before the image ignores the image and is the text-only model. transformers': it is not.
    assert torch.equal(got[:, :first], got_other[:, :first])
    assert (got[:, :first] - text_only).abs().max() <= 1e-5
    assert (got[:, first:] - got_other[:, first:]).abs().max() > 1e-3
    assert (ref[:, :first] - ref_other[:, :first]).abs().max() > 1e-3
    assert meta.config.encoder.intermediate_layers == [1, 2]
    assert ours(hf_model, "transformers").config.encoder.intermediate_layers == [2, 3]


def test_folder_round_trip(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    a, b = load_mllama(tmp_path, semantics="transformers", image_token_id=OUR_IMAGE), ours(hf_model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_released_layout_keys_load(hf_model):
    """transformers 4.x files (`language_model.model.*`, `language_model.lm_head`) load the same."""
    old = {}
    for k, v in hf_model.state_dict().items():
        k = k.removeprefix("model.")
        k = k.replace("language_model.", "language_model.model.", 1) if k.startswith("language_model.") else k
        old["language_model.lm_head.weight" if k == "lm_head.weight" else k] = v
    a = build_mllama(old, hf_model.config.to_dict(), "old", image_token_id=OUR_IMAGE)
    b = ours(hf_model, "meta")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_checkpoints_name_the_problem(hf_model):
    state, config = hf_model.state_dict(), hf_model.config.to_dict()
    extra = {**state, "model.vision_model.surprise": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="surprise"):
        build_mllama(extra, config, image_token_id=OUR_IMAGE)
    missing = {k: v for k, v in state.items() if "cross_attn_mlp_gate" not in k}
    with pytest.raises(CheckpointError, match="gate_ffwd"):
        build_mllama(missing, config, image_token_id=OUR_IMAGE)
    with pytest.raises(CheckpointError, match="model_type"):
        build_mllama(state, {**config, "model_type": "llama"}, image_token_id=OUR_IMAGE)
    bad = {**config, "vision_config": {**config["vision_config"], "vision_output_dim": 64}}
    with pytest.raises(CheckpointError, match="vision_output_dim"):
        build_mllama(state, bad, image_token_id=OUR_IMAGE)
    with pytest.raises(FileNotFoundError, match="no such"):
        load_mllama("/nonexistent/mllama")


def test_real_size_vision_parameter_counts():
    """Meta device, no memory: ours equals transformers' count for the released shapes (HF card: 10,670,220,835)."""
    from mm_llama.config.vision import VisionConfig
    from mm_llama.model.args import LlamaArgs

    lm = LlamaArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                   ffn_dim_multiplier=1.3)
    with torch.device("meta"):
        model = MultimodalModel(lm, VisionConfig())
    total = sum(p.numel() for p in model.parameters())
    assert total == 10_670_220_835
    assert sum(p.numel() for p in model.vision.parameters()) == 863_567_379 + 31_461_376
    assert math.isclose(total / 1e9, 10.67, abs_tol=0.005)

"""Tiling (against hand-computed cases and transformers' copies of Meta's formulas) and the image encoder."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from transformers.models.mllama.image_processing_mllama import get_image_size_fit_to_canvas, get_optimal_tiled_canvas

from encoders.vision import (
    CLIP_MEAN,
    CLIP_STD,
    VisionEncoder,
    VisionEncoderArgs,
    best_canvas,
    fit_size,
    supported_aspect_ratios,
    tile_image,
)

TINY = dict(tile_size=28, patch_size=14, width=32, layers=3, heads=4, max_num_tiles=2, intermediate_layers=[1, 3],
            n_global_layers=2)


def test_supported_grids():
    assert supported_aspect_ratios(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    assert supported_aspect_ratios(2) == ((1, 1), (1, 2), (2, 1))


@pytest.mark.parametrize("h, w, grid", [
    (100, 100, (1, 1)),   # every canvas upscales by ≥ 2.24: the smallest area wins
    (200, 500, (1, 3)),   # 1x3 and 1x4 both upscale by 1.12; 1x3 is smaller
    (1000, 1000, (2, 2)),  # nothing upscales: least downscale (0.448)
    (300, 800, (1, 3)),   # least downscale 0.747, shared by 1x3 and 1x4
    (800, 300, (3, 1)),
])
def test_best_canvas_hand_cases(h, w, grid):
    assert best_canvas(h, w, 224, 4) == grid


@pytest.mark.parametrize("h, w, canvas, size", [
    (300, 800, (224, 672), (224, 597)),  # downscale to the height, width floor(800·224/300)
    (50, 100, (224, 224), (112, 224)),   # small image: upscaled until its long side is one tile
    (20, 50, (28, 56), (20, 50)),        # fits already: unchanged
])
def test_fit_size_hand_cases(h, w, canvas, size):
    assert fit_size(h, w, *canvas, tile_size=canvas[0] if canvas[0] == canvas[1] else min(canvas)) == size


def test_canvas_and_size_agree_with_meta_formulas_everywhere():
    """transformers' `get_optimal_tiled_canvas` / `get_image_size_fit_to_canvas` are ports of Meta's."""
    for h in range(10, 1300, 37):
        for w in range(10, 1300, 41):
            rows, cols = best_canvas(h, w, 224, 4)
            assert (rows * 224, cols * 224) == tuple(int(v) for v in get_optimal_tiled_canvas(h, w, 4, 224))
            assert fit_size(h, w, rows * 224, cols * 224, 224) == get_image_size_fit_to_canvas(
                h, w, rows * 224, cols * 224, 224)


def test_tile_image_pads_black_normalises_and_orders_tiles():
    img = np.zeros((20, 50, 3), dtype=np.uint8)
    img[:, :25] = 255  # left half white, right half black
    tiles, grid = tile_image(Image.fromarray(img), 28, 2)
    assert grid == (1, 2) and tiles.shape == (2, 3, 28, 28)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    white, black = ((1 - mean) / std).expand(3, 20, 25), (-mean / std)
    assert torch.allclose(tiles[0, :, :20, :25], white)                       # image, untouched (no resize)
    assert torch.allclose(tiles[0, :, 20:], black.expand(3, 8, 28))          # padding at the bottom
    assert torch.allclose(tiles[1, :, :, 22:], black.expand(3, 28, 6))       # padding at the right (cols 50..55)
    same, _ = tile_image(torch.from_numpy(img).permute(2, 0, 1).contiguous(), 28, 2)
    assert torch.equal(same, tiles)


def test_tile_image_rejects_bad_inputs():
    with pytest.raises(ValueError, match="uint8"):
        tile_image(torch.rand(3, 10, 10), 28, 2)
    with pytest.raises(ValueError, match=r"\[3, height, width\]"):
        tile_image(torch.zeros(10, 10, dtype=torch.uint8), 28, 2)
    with pytest.raises(TypeError, match="PIL"):
        tile_image("cat.png", 28, 2)


def encoder(seed=0, **kw) -> VisionEncoder:
    torch.manual_seed(seed)
    args = VisionEncoderArgs(**{**TINY, **kw})
    return VisionEncoder(args, out_dim=args.output_dim).eval()


def identity_projection(enc: VisionEncoder) -> None:
    with torch.no_grad():
        enc.projection.weight.copy_(torch.eye(enc.args.output_dim))
        enc.projection.bias.zero_()


def test_taps_are_block_inputs_interleaved_per_channel():
    enc = encoder()
    identity_projection(enc)
    seen = []
    for block in enc.vit.transformer.resblocks:
        block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    images, ratios = torch.randn(1, 1, 2, 3, 28, 28), torch.tensor([[[1, 2]]])
    with torch.no_grad():
        out = enc(images, ratios)
    assert out.shape == (1, 1, 2, 5, 32 * 3)
    with torch.no_grad():  # the last block's output = tap 3 (layers)
        final_block_out = enc.vit.transformer.resblocks[-1](seen[-1], attn_mask=enc.attention_mask(ratios[0], 8))
    taps = torch.stack([seen[1], final_block_out], dim=-1).flatten(-2)  # tap 1 = input of block 1
    assert torch.allclose(out[0, 0, :, :, 32:], taps.view(2, 8, 64)[:, :5], atol=1e-6)


def test_gates_start_closed_and_open_the_tile_embeddings():
    enc = encoder()
    images, ratios = torch.randn(1, 1, 2, 3, 28, 28), torch.tensor([[[2, 1]]])
    with torch.no_grad():
        base = enc(images, ratios)
        for name in ("pre_tile_embedding", "post_tile_embedding", "tile_position_embedding"):
            getattr(enc, name).add_(1.0)
        assert torch.equal(enc(images, ratios), base)  # gates at zero: tables unused
        for layer in enc.global_layers:
            assert layer.gate_attn.item() == 0 and layer.gate_ffn.item() == 0
        enc.pre_tile_gate.fill_(0.5)
        assert (enc(images, ratios) - base).abs().max() > 1e-3


def test_tiles_attend_across_the_image_and_unused_tiles_are_padding():
    enc = encoder()
    with torch.no_grad():
        enc.pre_tile_gate.fill_(0.3)
        enc.position_gate.fill_(0.3)
    images = torch.randn(1, 1, 2, 3, 28, 28)
    other = images.clone()
    other[:, :, 1] = torch.randn(3, 28, 28)
    two, one = torch.tensor([[[1, 2]]]), torch.tensor([[[1, 1]]])
    with torch.no_grad():
        assert (enc(images, two)[0, 0, 0] - enc(other, two)[0, 0, 0]).abs().max() > 1e-4  # tile 0 sees tile 1
    # Meta's mask: pad→pad pairs blocked only; tile 1 of a 1x1 image and the 3 alignment tokens are pad.
    mask = enc.attention_mask(one[0], 8)[0, 0]
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[0, :5] = False
    pad = pad.flatten()
    assert torch.equal(mask < -1e30, pad[:, None] & pad[None, :])


def test_grid_ids_follow_transformers_and_reject_unknown_grids():
    enc = encoder(max_num_tiles=4)
    grids = torch.tensor([[0, 0], [1, 1], [1, 4], [2, 2], [4, 1]])
    assert enc.grid_index(grids).tolist() == [0, 1, 4, 6, 8]
    with pytest.raises(ValueError, match=r"\[2, 3\]"):
        enc.grid_index(torch.tensor([[2, 3]]))
    with pytest.raises(ValueError, match="images must be"):
        enc(torch.zeros(1, 1, 3, 3, 28, 28), torch.ones(1, 1, 2, dtype=torch.long))


def test_open_clip_checkpoint_loads_into_the_backbone(tmp_path):
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 28, "layers": 3, "width": 32, "patch_size": 14,
                                           "head_width": 8, "mlp_ratio": 4.0},
           "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "tiny-vit-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "tiny-vit-test.json")
    clip = open_clip.create_model("tiny-vit-test", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    enc = VisionEncoder(VisionEncoderArgs(**{**TINY, "attention_bias": True, "checkpoint": str(tmp_path / "clip.pt")}),
                        out_dim=8)
    assert enc.vit.proj is None
    for k, v in enc.vit.state_dict().items():
        assert torch.equal(v, clip.visual.state_dict()[k]), k
    with pytest.raises(ValueError, match="clip.pt.*attention_bias"):
        VisionEncoder(VisionEncoderArgs(**{**TINY, "checkpoint": str(tmp_path / "clip.pt")}), out_dim=8)
    with pytest.raises(ValueError, match="positional_embedding.*tile_size"):
        VisionEncoder(VisionEncoderArgs(**{**TINY, "attention_bias": True, "patch_size": 7,
                                           "checkpoint": str(tmp_path / "clip.pt")}), out_dim=8)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        VisionEncoder(VisionEncoderArgs(**{**TINY, "checkpoint": str(tmp_path / "missing.pt")}), out_dim=8)


@pytest.mark.parametrize("bad, match", [
    ({"tile_size": 30}, "patch_size"),
    ({"heads": 5}, "heads"),
    ({"intermediate_layers": [3, 1]}, "increasing"),
    ({"intermediate_layers": [0]}, "outside"),
    ({"tiles": 4}, "extra"),
])
def test_args_errors_name_the_field(bad, match):
    with pytest.raises(ValidationError, match=match):
        VisionEncoderArgs(**{**TINY, **bad})


def test_released_encoder_shape_counts():
    """ViT-H/14: 32 blocks of 1280 without attention biases = 629.5M ("630M"); the whole 11B encoder + projection = 895,028,755."""
    with torch.device("meta"):
        enc = VisionEncoder(VisionEncoderArgs(), out_dim=4096)
    blocks = sum(p.numel() for p in enc.vit.transformer.resblocks.parameters())
    assert blocks == 629_514_240
    assert VisionEncoderArgs().output_dim == 7680
    assert sum(p.numel() for p in enc.parameters()) == 895_028_755

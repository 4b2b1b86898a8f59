"""The video adapter: perceiver-resampler grouping, the video visibility rule, placement, and the composed model's
guarantee that a fresh video adapter (gates at zero) leaves the image model's output unchanged."""
from __future__ import annotations

import pytest
import torch

from adapters.video import TemporalAggregator, frame_token_mask, resize_time_embedding, video_mask
from mm_llama.config import ModelConfig
from mm_llama.config.video import VideoConfig
from mm_llama.config.vision import VisionConfig
from mm_llama.model import LlamaArgs
from mm_llama.model.multimodal import MultimodalModel

IMG, VID = 90, 91
LM = LlamaArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, rope_theta=10000.0)
VISION = VisionConfig(
    encoder=dict(tile_size=28, patch_size=14, width=32, layers=2, heads=4, max_num_tiles=2,
                 intermediate_layers=[1], n_global_layers=1),
    n_cross_attention_layers=2, image_token_id=IMG)
VIDEO = VideoConfig(max_frames=8, frames_per_group=4, n_latents=3, video_token_id=VID, every_image_layers=1)


def aggregator(**kw) -> TemporalAggregator:
    torch.manual_seed(0)
    args = dict(frames_per_group=4, max_frames=8, n_latents=3, layers=2, heads=4, ffn_mult=2, media_tokens=5) | kw
    return TemporalAggregator(16, **args).eval()


def test_aggregator_groups_consecutive_frames():
    agg = aggregator()
    frames = torch.randn(2, 8, 5, 16)
    mask = torch.ones(2, 8, 5, dtype=torch.bool)
    out, groups = agg(frames, mask)
    assert out.shape == (2, 2, 3, 16) and groups.tolist() == [[True, True], [True, True]]
    # group 1 of video 0 depends only on frames 4..7 of video 0
    changed = frames.clone()
    changed[0, :4] = torch.randn(4, 5, 16)
    again, _ = agg(changed, mask)
    assert not torch.allclose(again[0, 0], out[0, 0]) and torch.equal(again[0, 1], out[0, 1])
    assert torch.equal(again[1], out[1])
    # the same frames in another group see other time embeddings: order matters
    swapped = frames.clone()
    swapped[0, :4] = frames[0, :4].flip(0)
    assert not torch.allclose(agg(swapped, mask)[0][0, 0], out[0, 0])


def test_aggregator_ignores_masked_tokens_and_marks_empty_groups():
    agg = aggregator()
    frames = torch.randn(1, 8, 5, 16)
    mask = torch.ones(1, 8, 5, dtype=torch.bool)
    mask[0, 2:4] = False  # frames 2, 3 are padding
    mask[0, :, 4] = False  # the last token of every frame is padding
    mask[0, 4:] = False  # the second group has no real frame
    out, groups = agg(frames, mask)
    garbage = frames.clone()
    garbage[0, 2:4] = 1e3
    garbage[0, :, 4] = -1e3
    out2, _ = agg(garbage, mask)
    assert torch.allclose(out[0, 0], out2[0, 0], atol=1e-6)
    assert groups.tolist() == [[True, False]]
    with pytest.raises(ValueError, match="multiple of frames_per_group"):
        agg(torch.randn(1, 6, 5, 16), torch.ones(1, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_frames"):
        agg(torch.randn(1, 12, 5, 16), torch.ones(1, 12, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for 5"):
        agg(torch.randn(1, 8, 6, 16), torch.ones(1, 8, 6, dtype=torch.bool))


def test_aggregator_gain_scales_keys_and_values_per_frame_and_slot():
    """The media the latents read is LN(frame tokens + time embedding) · (1 + time_gain[t]) · (1 + slot_gain[p])."""
    agg = aggregator(layers=1)
    frames = torch.randn(2, 8, 5, 16)
    mask = torch.ones(2, 8, 5, dtype=torch.bool)
    out, _ = agg(frames, mask)
    layer = agg.layers[0]
    x = (frames + agg.time_embedding[:, None]).reshape(4, 20, 16)
    gain = ((1 + agg.time_gain[:, None]) * (1 + agg.slot_gain)).reshape(2, 20, 16).repeat(2, 1, 1)
    latents = agg.latents.expand(4, -1, -1)
    q_in = layer.norm_latents(latents)
    kv = torch.cat([layer.norm_media(x) * gain, q_in], 1)
    k, v = layer.wkv(kv).chunk(2, -1)
    heads = lambda t: t.view(4, t.shape[1], 4, 4).transpose(1, 2)
    attn = torch.softmax(heads(layer.wq(q_in)) @ heads(k).transpose(-1, -2) / 2.0, -1) @ heads(v)
    latents = latents + layer.wo(attn.transpose(1, 2).reshape(4, 3, 16))
    expected = agg.norm(latents + layer.ffn(latents)).view(2, 2, 3, 16)
    assert torch.allclose(out, expected, atol=1e-5)
    # a slot's gain changes what the latents read from that slot only when the slot is real
    with torch.no_grad():
        agg.slot_gain[4] += 1.0
    assert not torch.allclose(agg(frames, mask)[0], out)
    mask[:, :, 4] = False
    before, _ = agg(frames, mask)
    with torch.no_grad():
        agg.slot_gain[4] -= 3.0
    assert torch.allclose(agg(frames, mask)[0], before, atol=1e-6)


def test_frame_token_mask_and_time_resize():
    ratios = torch.tensor([[[1, 1], [1, 2], [1, 1]]])
    mask = frame_token_mask(ratios, torch.tensor([[True, True, False]]), max_tiles=2, tokens_per_tile=3)
    assert mask.tolist() == [[[True] * 3 + [False] * 3, [True] * 6, [False] * 6]]
    table = torch.arange(4.0)[:, None].repeat(1, 2)  # 0, 1, 2, 3
    wide = resize_time_embedding(table, 7)
    assert wide[:, 0].tolist() == pytest.approx([0, 0.5, 1, 1.5, 2, 2.5, 3])
    assert resize_time_embedding(table, 4) is table


def test_video_mask_follows_the_image_rule():
    tokens = torch.tensor([[1, VID, 2, 3, VID, 4], [VID, 5, 6, 7, 8, 9]])
    groups = torch.tensor([[[True, True], [True, False]], [[True, False], [False, False]]])
    mask = video_mask(tokens, VID, groups)
    assert mask.shape == (2, 6, 2, 2)
    assert mask[0, :, 0].tolist() == [[False, False], [True, True], [True, True], [True, True], [False, False], [False, False]]
    assert mask[0, 4:, 1].tolist() == [[True, False], [True, False]] and not mask[0, :4, 1].any()
    assert mask[1, :, 0, 0].all() and not mask[1, :, 1].any()
    with pytest.raises(ValueError, match="no frames"):
        video_mask(torch.tensor([[VID, VID]]), VID, torch.tensor([[[True], [False]]]))
    with pytest.raises(ValueError, match="2 <\\|video\\|> tokens but only 1"):
        video_mask(torch.tensor([[VID, VID]]), VID, torch.tensor([[[True]]]))


def test_placement_before_every_fourth_image_block():
    cfg = VideoConfig()
    assert cfg.layers_for([3, 7, 11, 15, 19, 23, 27, 31], 32) == [15, 31]  # 11B: 8 image blocks
    assert cfg.layers_for(list(range(3, 80, 4)), 80) == [15, 31, 47, 63, 79]  # 90B: 20 image blocks
    assert cfg.layers_for([1, 3], 4) == [3]
    assert VideoConfig(cross_attention_layers=[0, 2]).layers_for([1, 3], 4) == [0, 2]
    with pytest.raises(ValueError, match="exceed"):
        VideoConfig(cross_attention_layers=[9]).layers_for([1, 3], 4)
    assert cfg.video_token_for(128256) == 128012 and cfg.max_groups == 2
    with pytest.raises(ValueError, match="needs a vision"):
        ModelConfig(name="x", lm=LM, video=VideoConfig())


def video_model(seed=0, gates=0.0) -> MultimodalModel:
    torch.manual_seed(seed)
    m = MultimodalModel(LM, VISION, VIDEO).eval()
    with torch.no_grad():
        for block in m.cross_attention.values():  # open image gates: the image path must matter
            block.gate_attn.fill_(0.7)
            block.gate_ffwd.fill_(0.7)
        for block in m.video_cross_attention.values():
            block.gate_attn.fill_(gates)
            block.gate_ffwd.fill_(gates)
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 80, (2, 12), generator=g)
    tokens[0, 3], tokens[0, 6], tokens[1, 1] = IMG, VID, VID
    images = torch.randn(2, 1, 2, 3, 28, 28, generator=g)
    ratios = torch.tensor([[[1, 2]], [[0, 0]]])
    videos = torch.randn(2, 1, 8, 2, 3, 28, 28, generator=g)
    vratios = torch.tensor([1, 1]).expand(2, 1, 8, 2).clone()
    frames = torch.ones(2, 1, 8, dtype=torch.bool)
    frames[1, 0, 3:] = False  # the second clip has 3 frames: one real group
    return tokens, images, ratios, videos, vratios, frames


def test_video_model_shapes_and_placement():
    m = video_model(gates=0.5)
    assert sorted(m.video_cross_attention) == ["1", "3"] and sorted(m.cross_attention) == ["1", "3"]
    tokens, images, ratios, videos, vratios, frames = inputs()
    ctx = m.encode_videos(videos, vratios, frames)
    assert ctx.tokens.shape == (2, 1, 2, 3, 64) and ctx.group_mask.tolist() == [[[True, True]], [[True, False]]]
    assert ctx.kv["1"][0].shape == (2, 2, 1 * 2 * 3, 16)
    logits = m(tokens, images=images, aspect_ratios=ratios, videos=videos, video_aspect_ratios=vratios, frame_mask=frames)
    assert logits.shape == (2, 12, 97)
    # rows before <|video|> see no video: they equal the model without the video adapter's effect
    plain = video_model(gates=0.0)(tokens, images=images, aspect_ratios=ratios, videos=videos,
                                   video_aspect_ratios=vratios, frame_mask=frames)
    assert torch.equal(logits[0, :6], plain[0, :6]) and not torch.allclose(logits[0, 6:], plain[0, 6:])
    # the video context can be computed once and reused
    again = m(tokens, images=images, aspect_ratios=ratios, video_context=ctx)
    assert torch.allclose(again, logits, atol=1e-6)
    with pytest.raises(ValueError, match="no videos were passed"):
        m(tokens, images=images, aspect_ratios=ratios)
    with pytest.raises(ValueError, match="frame_mask"):
        m(tokens, images=images, aspect_ratios=ratios, videos=videos, video_aspect_ratios=vratios)


def test_zero_video_gates_equal_the_image_model_exactly():
    m = video_model(gates=0.0)
    image_only = MultimodalModel(LM, VISION).eval()
    image_state = {k: v for k, v in m.state_dict().items() if not k.startswith(("video_aggregator.", "video_cross_attention."))}
    image_only.load_state_dict(image_state)
    tokens, images, ratios, videos, vratios, frames = inputs()
    with torch.no_grad():
        composed = m(tokens, images=images, aspect_ratios=ratios, videos=videos, video_aspect_ratios=vratios,
                     frame_mask=frames)
        # the image model reads <|video|> as an ordinary (frozen) LM token
        reference = image_only(tokens, images=images, aspect_ratios=ratios)
    assert torch.equal(composed, reference)


def test_paper_scale_video_parameters():
    """Aggregator + video cross-attention for Llama 3 8B (32 layers, 8 image blocks): the paper's 0.6B."""
    from mm_llama.config import load_config
    from mm_llama.config.load import CONFIG_ROOT
    from mm_llama.config.stage import StageConfig

    cfg = load_config(StageConfig, CONFIG_ROOT / "stages" / "video_adapter.yaml").model
    with torch.device("meta"):
        m = MultimodalModel(cfg.lm, cfg.vision, cfg.video)
    video = sum(p.numel() for n, p in m.named_parameters() if n.startswith(("video_aggregator.", "video_cross_attention.")))
    assert sorted(map(int, m.video_cross_attention)) == [15, 31]
    assert 0.55e9 < video < 0.7e9, video

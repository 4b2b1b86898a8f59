"""Gated cross-attention, image visibility masks and the composed model's guarantees (SPEC §4.3)."""
from __future__ import annotations

import pytest
import torch
from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

from adapters import CrossAttentionBlock, cross_attention_bias, fusion_schedule, image_spans
from mm_llama.config.vision import VisionConfig
from mm_llama.model import KVCache, LlamaArgs
from mm_llama.model.multimodal import MultimodalModel

IMG = 90
LM = LlamaArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, rope_theta=10000.0)
VISION = VisionConfig(
    encoder=dict(tile_size=28, patch_size=14, width=32, layers=3, heads=4, max_num_tiles=2,
                 intermediate_layers=[1, 3], n_global_layers=1),
    n_cross_attention_layers=2, image_token_id=IMG)


def model(seed=0, gates=0.0) -> MultimodalModel:
    torch.manual_seed(seed)
    m = MultimodalModel(LM, VISION).eval()
    with torch.no_grad():
        for block in m.cross_attention.values():
            block.gate_attn.fill_(gates)
            block.gate_ffwd.fill_(gates)
    return m


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 80, (2, 14), generator=g)
    tokens[0, 5], tokens[1, 2], tokens[1, 9] = IMG, IMG, IMG  # text before the image; two images
    images = torch.randn(2, 2, 2, 3, 28, 28, generator=g)
    ratios = torch.tensor([[[1, 2], [0, 0]], [[2, 1], [1, 1]]])
    return tokens, images, ratios


def test_fusion_schedule_matches_meta():
    assert fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert fusion_schedule(80, 20) == list(range(3, 80, 4))
    assert fusion_schedule(6, 3) == [1, 3, 5]
    with pytest.raises(ValueError, match="only 3"):
        fusion_schedule(6, 4)  # every 2nd of 6 layers gives 3 places, not 4
    assert fusion_schedule(4, 2) == [1, 3]
    with pytest.raises(ValueError, match="cross-attention"):
        fusion_schedule(4, 5)


def test_image_spans_hand_cases_and_transformers():
    im = 9
    cases = {
        (1, im, 2, 3): [(1, 4)],
        (im, 2, im, 3, 4): [(0, 2), (2, 5)],
        (1, im, im, 2, 3): [(1, 5), (2, 5)],  # consecutive images both see the text that follows
        (1, 2): [],
    }
    for tokens, spans in cases.items():
        assert image_spans(list(tokens), im) == spans
        hf = [(s, len(tokens) if e == -1 else e) for s, e in get_cross_attention_token_mask(list(tokens), im)]
        assert hf == spans


def test_vision_mask_and_bias():
    m = model()
    tokens, _, ratios = batch()
    mask = m.vision_mask(tokens, ratios)
    assert mask.shape == (2, 14, 2, 2)
    assert not mask[0, :5].any() and mask[0, 5:, 0].all() and not mask[0, :, 1].any()
    assert mask[1, 2:9, 0].all() and not mask[1, 9:, 0].any() and mask[1, 9:, 1, 0].all() and not mask[1, :, 1, 1].any()
    bias, rows = cross_attention_bias(mask, tokens_per_tile=5)
    assert bias.shape == (2, 1, 14, 20) and rows[0, :5].eq(0).all() and rows[0, 5:].eq(1).all()
    assert bias[0, 0, :5].eq(0).all()  # image-less rows attend everywhere (finite softmax); rows masks them
    assert bias[1, 0, 9, :5].lt(-1e30).all() and bias[1, 0, 9, 10:15].eq(0).all() and bias[1, 0, 9, 15:].lt(-1e30).all()


def test_cross_attention_against_explicit_formula():
    torch.manual_seed(0)
    block = CrossAttentionBlock(LM)
    with torch.no_grad():
        block.gate_attn.fill_(0.7)
        block.gate_ffwd.fill_(-0.3)
        block.attention.q_norm.weight.uniform_(0.5, 1.5)
        block.attention.k_norm.weight.uniform_(0.5, 1.5)
    x, img = torch.randn(2, 6, 64), torch.randn(2, 10, 64)
    allowed = torch.rand(2, 6, 10) > 0.3
    allowed[:, 0] = False  # a row that sees nothing
    bias = torch.zeros(2, 1, 6, 10).masked_fill(~(allowed | ~allowed.any(-1, keepdim=True))[:, None], -1e30)
    rows = allowed.any(-1, keepdim=True).float()
    got = block(x, block.kv(img), bias, rows)

    a, hd = block.attention, 16
    def heads(t, n):
        return t.view(2, -1, n, hd)
    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    xn = rms(x, block.attention_norm.weight)
    q = rms(heads(a.wq(xn), 4), a.q_norm.weight).transpose(1, 2)
    k = rms(heads(a.wk(img), 2), a.k_norm.weight).transpose(1, 2).repeat_interleave(2, dim=1)
    v = heads(a.wv(img), 2).transpose(1, 2).repeat_interleave(2, dim=1)
    att = ((q @ k.transpose(-1, -2)) / hd**0.5 + bias).softmax(-1) @ v
    h = x + torch.tanh(torch.tensor(0.7)) * rows * a.wo(att.transpose(1, 2).reshape(2, 6, 64))
    want = h + torch.tanh(torch.tensor(-0.3)) * rows * block.feed_forward(rms(h, block.ffn_norm.weight))
    assert (got - want).abs().max() < 1e-5
    assert torch.equal(got[:, 0], x[:, 0])  # the image-less row: both branches zero


def test_gates_at_zero_give_the_text_lm_exactly():
    m = model()
    tokens, images, ratios = batch()
    with torch.no_grad():
        assert torch.equal(m(tokens, images=images, aspect_ratios=ratios), m.lm(tokens))


def test_text_before_first_image_gets_nothing_from_either_branch():
    m = model(gates=0.9)
    tokens, images, ratios = batch()
    with torch.no_grad():
        a = m(tokens, images=images, aspect_ratios=ratios)
        b = m(tokens, images=images.flip(-1) * 3, aspect_ratios=ratios)
        text = m.lm(tokens)
        assert torch.equal(a[0, :5], b[0, :5]) and torch.equal(a[1, :2], b[1, :2])
        assert torch.equal(a[0, :5], text[0, :5])  # also no FFN contribution on those rows
        assert (a[0, 5:] - b[0, 5:]).abs().max() > 1e-3 and (a[0, 5:] - text[0, 5:]).abs().max() > 1e-3
        # transformers' variant (attention branch unmasked) leaks the image into those rows.
        for block in m.cross_attention.values():
            block.mask_attention_rows = False
        c = m(tokens, images=images, aspect_ratios=ratios)
        d = m(tokens, images=images.flip(-1) * 3, aspect_ratios=ratios)
        assert (c[0, :5] - d[0, :5]).abs().max() > 1e-4


def test_image_kv_computed_once_and_reused_in_cached_decoding():
    m = model(gates=0.6)
    tokens, images, ratios = batch()
    with torch.no_grad():
        full = m(tokens, images=images, aspect_ratios=ratios)
        context = m.encode_images(images, ratios)
        assert torch.equal(m(tokens, image_context=context), full)
        mask = m.vision_mask(tokens, ratios)
        caches = [KVCache(2, LM.kv_heads, 32, LM.head_dim) for _ in range(LM.n_layers)]
        steps = [m(tokens[:, :6], image_context=context, vision_mask=mask[:, :6], caches=caches)]
        for t in range(6, 14):
            steps.append(m(tokens[:, t:t + 1], image_context=context, vision_mask=mask[:, t:t + 1], caches=caches,
                           start_pos=t))
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5


def test_image_token_embedding_is_separate_and_starts_as_the_lm_row():
    m = model()
    assert torch.equal(m.image_embedding.weight[0], m.lm.tok_embeddings.weight[IMG])
    assert m.image_embedding.weight.shape == (8, 64)
    tokens, images, ratios = batch()
    m(tokens, images=images, aspect_ratios=ratios).sum().backward()
    assert m.lm.tok_embeddings.weight.grad[IMG].eq(0).all()  # the frozen table never learns <|image|>
    assert m.image_embedding.weight.grad[0].abs().sum() > 0
    assert not any(k.startswith("lm.") and "cross" in k for k in m.state_dict())
    assert set(m.lm.state_dict()) == set(MultimodalModel(LM, VISION).lm.state_dict())


def test_bad_inputs_are_named():
    m = model()
    tokens, images, ratios = batch()
    with pytest.raises(ValueError, match="no images"):
        m(tokens)
    with pytest.raises(ValueError, match="aspect_ratios"):
        m(tokens, images=images)
    too_many = tokens.clone()
    too_many[0, 1] = IMG
    too_many[0, 8] = IMG
    with pytest.raises(ValueError, match="image slots"):
        m(too_many, images=images, aspect_ratios=ratios)
    empty = tokens.clone()
    empty[0, 10] = IMG  # a second <|image|> in sample 0, whose second slot is empty
    with pytest.raises(ValueError, match=r"\(0, 0\)"):
        m(empty, images=images, aspect_ratios=ratios)
    with pytest.raises(ValueError, match="vision_mask must be"):
        m(tokens, images=images, aspect_ratios=ratios, vision_mask=torch.ones(2, 14, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        MultimodalModel(LM, VisionConfig(encoder=VISION.encoder, image_token_id=97))
    with pytest.raises(ValueError, match="exceed"):
        MultimodalModel(LM, VisionConfig(encoder=VISION.encoder, cross_attention_layers=[1, 4], image_token_id=IMG))
    with pytest.raises(ValueError, match="extra"):
        VisionConfig(not_a_field=1)


def test_tiny_vision_config_builds_and_runs():
    from pathlib import Path

    import yaml

    data = yaml.safe_load((Path(__file__).parents[1] / "configs/models/tiny_vision.yaml").read_text())
    m = MultimodalModel(LlamaArgs(**data["lm"]), VisionConfig(**data["vision"])).eval()
    assert list(m.cross_attention) == ["1", "3"] and m.image_token_id == 4107
    tokens = torch.tensor([[4107, 5, 6, 7]])
    with torch.no_grad():
        out = m(tokens, images=torch.zeros(1, 1, 2, 3, 56, 56), aspect_ratios=torch.tensor([[[1, 1]]]))
    assert out.shape == (1, 4, 4352) and torch.equal(out, m.lm(tokens))

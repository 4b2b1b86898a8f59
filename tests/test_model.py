"""The Llama 3 decoder against an independent re-statement of Meta's reference formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from mm_llama.model import KVCache, LlamaArgs, Transformer, init_weights
from mm_llama.model.rope import apply_scaling


def meta_reference_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Meta's forward as written in models/llama3/model.py: complex rotary, repeat_kv, explicit softmax."""
    a = model.args
    hd = a.head_dim
    freqs = 1.0 / (a.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if a.use_scaled_rope:
        new = []
        for f in freqs.tolist():  # scalar loop, the way the reference states it
            wavelen = 2 * math.pi / f
            lo, hi = a.rope_original_context / a.rope_low_freq_factor, a.rope_original_context / a.rope_high_freq_factor
            if wavelen < hi:
                new.append(f)
            elif wavelen > lo:
                new.append(f / a.rope_scale_factor)
            else:
                s = (a.rope_original_context / wavelen - a.rope_low_freq_factor) / (a.rope_high_freq_factor - a.rope_low_freq_factor)
                new.append((1 - s) * f / a.rope_scale_factor + s * f)
        freqs = torch.tensor(new)
    t = tokens.shape[1]
    freqs_cis = torch.polar(torch.ones(t, hd // 2), torch.outer(torch.arange(t).float(), freqs))

    def rot(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    h = model.tok_embeddings.weight[tokens]
    b = tokens.shape[0]
    causal = torch.full((t, t), float("-inf")).triu(1)
    for layer in model.layers:
        at = layer.attention
        x = norm(h, layer.attention_norm.weight)
        q = rot((x @ at.wq.weight.T).view(b, t, a.n_heads, hd))
        k = rot((x @ at.wk.weight.T).view(b, t, a.kv_heads, hd))
        v = (x @ at.wv.weight.T).view(b, t, a.kv_heads, hd)
        rep = a.n_heads // a.kv_heads
        k = k[:, :, :, None, :].expand(b, t, a.kv_heads, rep, hd).reshape(b, t, a.n_heads, hd)
        v = v[:, :, :, None, :].expand(b, t, a.kv_heads, rep, hd).reshape(b, t, a.n_heads, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = (q @ k.transpose(2, 3)) / math.sqrt(hd) + causal
        out = (F.softmax(scores.float(), dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
        h = h + out @ at.wo.weight.T
        x = norm(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (F.silu(x @ ff.w1.weight.T) * (x @ ff.w3.weight.T)) @ ff.w2.weight.T
    return norm(h, model.norm.weight) @ model.output.weight.T


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_logits_match_meta_reference(tiny_args, scaled, kv_heads):
    args = tiny_args.model_copy(update={"use_scaled_rope": scaled, "n_kv_heads": kv_heads})
    torch.manual_seed(0)
    model = init_weights(Transformer(args))
    with torch.no_grad():  # larger weights than the init so attention patterns are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.2) if p.ndim > 1 else p.uniform_(0.5, 1.5)
    tokens = torch.randint(0, args.vocab_size, (2, 40))
    with torch.no_grad():
        ours, ref = model(tokens), meta_reference_logits(model, tokens)
    assert ours.shape == (2, 40, args.vocab_size)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_rope_scaling_matches_the_three_regimes():
    args = LlamaArgs(dim=64, n_layers=1, n_heads=1, vocab_size=8, use_scaled_rope=True)
    # wavelengths: 2π/1 (short, kept), 2π/1e-4 (long, divided by 8), and one inside the blend band
    f = torch.tensor([1.0, 1e-4, 2 * math.pi / 4096])
    out = apply_scaling(f, args)
    s = (8192 / 4096 - 1) / (4 - 1)
    expected = torch.tensor([1.0, 1e-4 / 8, (1 - s) * f[2].item() / 8 + s * f[2].item()])
    torch.testing.assert_close(out, expected)


def test_packed_documents_equal_documents_alone(tiny_args):
    torch.manual_seed(1)
    model = init_weights(Transformer(tiny_args)).eval()
    lengths = [7, 12, 5]
    docs = [torch.randint(0, tiny_args.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = model(packed, doc_ids=doc_ids)
        alone = torch.cat([model(d) for d in docs], dim=1)
        plain = model(packed)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # and the mask matters: without it, later documents see earlier ones
    assert (plain[:, lengths[0]:] - alone[:, lengths[0]:]).abs().max() > 1e-3


def test_kv_cache_decoding_equals_full_forward(tiny_args):
    torch.manual_seed(2)
    model = init_weights(Transformer(tiny_args)).eval()
    tokens = torch.randint(0, tiny_args.vocab_size, (2, 20))
    a = tiny_args
    caches = [KVCache(2, a.kv_heads, 32, a.head_dim) for _ in range(a.n_layers)]
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :12], caches=caches)]
        steps += [model(tokens[:, i:i + 1], caches=caches, start_pos=i) for i in range(12, 16)]
        steps.append(model(tokens[:, 16:], caches=caches, start_pos=16))  # a multi-token chunk after the prefix
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds 32"):
        model(torch.zeros(2, 40, dtype=torch.long), caches=caches)


def test_tied_embeddings_share_one_tensor(tiny_args):
    model = Transformer(tiny_args.model_copy(update={"tie_embeddings": True}))
    assert model.output.weight is model.tok_embeddings.weight


def test_init_scales_residual_projections(tiny_args):
    args = tiny_args.model_copy(update={"dim": 256, "n_heads": 4, "n_kv_heads": 4, "n_layers": 8})
    model = init_weights(Transformer(args), torch.Generator().manual_seed(0))
    assert abs(model.layers[0].attention.wq.weight.std().item() - 0.02) < 2e-3
    assert abs(model.layers[0].attention.wo.weight.std().item() - 0.02 / 4) < 5e-4
    assert abs(model.layers[3].feed_forward.w2.weight.std().item() - 0.02 / 4) < 5e-4
    assert torch.equal(model.norm.weight, torch.ones(256))


@pytest.mark.parametrize(
    "update, message",
    [
        ({"n_heads": 5}, "n_heads \\(5\\) must divide dim"),
        ({"n_kv_heads": 3}, "n_kv_heads \\(3\\) must divide n_heads"),
        ({"dim": 0}, "dim must be positive"),
        ({"dim": 12, "n_heads": 4, "n_kv_heads": 4}, "must be even"),
    ],
)
def test_impossible_shapes_are_rejected(update, message):
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97)
    with pytest.raises(ValueError, match=message):
        LlamaArgs(**{**base, **update})


def test_real_valued_rotary_used_under_compile_equals_the_complex_form():
    from mm_llama.model.rope import apply_rotary, apply_rotary_real, rotary_tables

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 0, 1, 2, 9]])
    cos, sin = rotary_tables(positions, 1.0 / (500000.0 ** (torch.arange(0, 8, 2).float() / 8)))
    want = apply_rotary(x, cos, sin)
    assert torch.allclose(apply_rotary_real(x, cos, sin), want, atol=1e-6)
    assert apply_rotary_real(x.bfloat16(), cos, sin).dtype == torch.bfloat16

"""BEST-RQ: seeded frozen targets, span masking with noise, loss on masked frames only, learning, code usage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from encoders.speech.args import BestRQArgs, ConformerArgs, FrontEndArgs
from encoders.speech.bestrq import (
    BestRQ,
    RandomProjectionQuantizer,
    code_perplexity,
    multi_softmax_loss,
    span_mask,
    target_mask,
)
from encoders.speech.conformer import ConformerEncoder
from encoders.speech.features import collate_features, features

ENC = ConformerArgs(n_mels=80, stack=4, dim=32, n_layers=1, n_heads=4, ffn_dim=64, conv_kernel=7, dropout=0.0)
RQ = BestRQArgs(n_codebooks=2, codebook_size=32, code_dim=16, seed=7)


def model(seed: int = 0, args: BestRQArgs = RQ) -> BestRQ:
    torch.manual_seed(seed)
    return BestRQ(ConformerEncoder(ENC), args)


def synth(n: int, rate: int = 16_000, seconds: float = 1.0) -> list[np.ndarray]:
    """Tones and chirps at different pitches and sweep rates, with a little noise."""
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    out = []
    for i in range(n):
        f0, f1 = 150.0 + 180 * i, 600.0 + 500 * (i % 3)
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds)) if i % 2 else 2 * np.pi * f0 * t
        out.append((0.4 * np.sin(phase) + 0.01 * rng.normal(size=t.shape)).astype(np.float32))
    return out


def batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return collate_features([features(torch.from_numpy(x), 16_000, FrontEndArgs()) for x in synth(n)])


def test_labels_are_reproducible_from_the_seed():
    x = torch.randn(3, 20, 320)
    a = RandomProjectionQuantizer(320, RQ)(x)
    assert a.shape == (3, 20, 2) and a.dtype == torch.long and 0 <= a.min() and a.max() < 32
    assert torch.equal(a, RandomProjectionQuantizer(320, RQ)(x))
    other = RandomProjectionQuantizer(320, RQ.model_copy(update={"seed": 8}))(x)
    assert (other != a).float().mean() > 0.5


def test_labels_are_nearest_codes_by_cosine():
    q = RandomProjectionQuantizer(320, RQ)
    x = torch.randn(50, 320)
    z = torch.einsum("nd,de->ne", x, q.projection[1])
    cos = torch.nn.functional.cosine_similarity(z[:, None, :], q.codebooks[1][None], dim=-1)
    assert torch.equal(q(x)[:, 1], cos.argmax(-1))
    torch.testing.assert_close(q.codebooks.norm(dim=-1), torch.ones(2, 32))


def test_quantizer_is_frozen_and_travels_in_the_state_dict():
    m = model()
    assert not any(n.startswith("quantizer") for n, _ in m.named_parameters())
    assert {"quantizer.projection", "quantizer.codebooks"} <= set(m.state_dict())
    before = {k: v.clone() for k, v in m.quantizer.state_dict().items()}
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    assert all(p is not m.quantizer.projection for g in opt.param_groups for p in g["params"])
    feats, lengths = batch(2)
    m(feats, lengths).loss.backward()
    opt.step()
    for k, v in m.quantizer.state_dict().items():
        assert torch.equal(v, before[k]) and not v.requires_grad
    # a checkpoint restores the targets even into a model built with another seed
    restored = model(args=RQ.model_copy(update={"seed": 99}))
    restored.load_state_dict(m.state_dict())
    x = torch.randn(1, 5, 320)
    assert torch.equal(restored.quantizer(x), m.quantizer(x))


def test_span_mask_statistics_lengths_and_seed():
    args = BestRQArgs(mask_prob=0.025, mask_span=32)
    lengths = torch.tensor([6000, 3000])
    m = span_mask(lengths, 6000, args, 4, torch.Generator().manual_seed(0))
    assert m.shape == (2, 6000) and not m[1, 3000:].any()
    expected = 1 - (1 - 0.025) ** 32  # ≈ 0.555: a frame is masked when a span started in the 32 frames up to it
    assert abs(m[0].float().mean() - expected) < 0.05
    assert torch.equal(m, span_mask(lengths, 6000, args, 4, torch.Generator().manual_seed(0)))
    assert not torch.equal(m, span_mask(lengths, 6000, args, 4, torch.Generator().manual_seed(1)))
    # masked runs are at least one span long unless cut by the utterance end
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, m[0].int().numpy(), 0])))[::2]
    assert runs.min() >= 32 or m[0, -1]


def test_every_utterance_gets_a_target():
    args = BestRQArgs(mask_prob=1e-6, mask_span=8)
    lengths = torch.tensor([12, 40, 4])
    m = span_mask(lengths, 40, args, 4, torch.Generator().manual_seed(0))
    assert target_mask(m, lengths, 4).any(1).all()


def test_target_frames_need_all_four_inputs_masked():
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 2:12] = True  # covers stacks 1 and 2 fully, stacks 0 and 3 partly
    assert target_mask(mask, torch.tensor([16]), 4).tolist() == [[False, True, True, False]]
    assert target_mask(mask, torch.tensor([8]), 4).tolist() == [[False, True, False, False]]


def test_masked_frames_become_noise_and_the_rest_is_untouched():
    m = model()
    feats, lengths = batch(2)
    seen = {}
    m.encoder.register_forward_pre_hook(lambda mod, inputs: seen.update(x=inputs[0]))
    out = m(feats, lengths, torch.Generator().manual_seed(3))
    masked = span_mask(lengths, feats.shape[1], RQ, 4, torch.Generator().manual_seed(3))
    x = seen["x"]
    assert torch.equal(x[~masked], feats[~masked])
    assert abs(x[masked].std() - RQ.noise_std) < 0.01 and abs(x[masked].mean()) < 0.01
    assert torch.equal(out.targets, target_mask(masked, lengths, 4))
    # labels come from the unmasked features
    assert torch.equal(out.labels, m.quantizer(feats[:, : feats.shape[1] // 4 * 4].reshape(2, -1, 320)))


def test_loss_sees_only_masked_frames():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 3, 10)
    labels = torch.randint(0, 10, (2, 6, 3))
    targets = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    loss = multi_softmax_loss(logits, labels, targets)
    perturbed = labels.clone()
    perturbed[~targets] = (perturbed[~targets] + 1) % 10
    noisy_logits = logits.clone()
    noisy_logits[~targets] = 100 * torch.randn_like(noisy_logits[~targets])
    assert torch.equal(loss, multi_softmax_loss(noisy_logits, perturbed, targets))
    changed = labels.clone()
    changed[targets] = (changed[targets] + 1) % 10
    assert not torch.equal(loss, multi_softmax_loss(logits, changed, targets))
    # the mean over codebooks of each codebook's mean cross-entropy
    per_book = [torch.nn.functional.cross_entropy(logits[targets][:, h], labels[targets][:, h]) for h in range(3)]
    torch.testing.assert_close(loss, torch.stack(per_book).mean())
    with pytest.raises(ValueError, match="no masked target frames"):
        multi_softmax_loss(logits, labels, torch.zeros_like(targets))


def test_model_loss_ignores_targets_of_unmasked_frames():
    m = model()
    feats, lengths = batch(2)
    seen = {}
    m.encoder.register_forward_hook(lambda mod, inputs, output: seen.update(encoded=output[0]))
    out = m(feats, lengths, torch.Generator().manual_seed(5))
    assert 0 < out.targets.sum() < out.targets.numel()
    labels = out.labels.clone()
    labels[~out.targets] = (labels[~out.targets] + 1) % RQ.codebook_size  # rewrite every unmasked target
    torch.testing.assert_close(multi_softmax_loss(m.logits(seen["encoded"]), labels, out.targets), out.loss)


def test_loss_falls_on_tones_and_chirps():
    m = model(seed=1)
    feats, lengths = batch(4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)  # fresh masks every step, same audio
    losses = []
    for _ in range(50):
        out = m(feats, lengths, g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert abs(losses[0] - math.log(32)) < 0.6  # starts near chance
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    assert 0.0 <= out.metrics["accuracy"] <= 1.0 and 0.0 < out.metrics["masked_fraction"] < 1.0


def test_code_usage_perplexity_catches_collapse():
    q = RandomProjectionQuantizer(320, BestRQArgs(n_codebooks=3, codebook_size=16, seed=0))
    spread = code_perplexity(q(torch.randn(4000, 320)), 16)
    assert spread.shape == (3,) and (spread > 13).all() and (spread <= 16).all()
    collapsed = code_perplexity(q(torch.ones(4000, 320)), 16)
    torch.testing.assert_close(collapsed, torch.ones(3))
    assert code_perplexity(torch.tensor([[0], [1], [2], [3]]), 8).item() == pytest.approx(4.0)
    m = model()
    feats, lengths = batch(2)
    constant = m(torch.ones_like(feats), lengths).metrics["code_perplexity"]
    assert constant.item() == pytest.approx(1.0) and m(feats, lengths).metrics["code_perplexity"] > 3

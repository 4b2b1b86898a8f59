"""Logits at the labelled positions only (`logits_at`): the same numbers as the full projection's rows, and
losses and DPO log-probs through it equal those of the full logits, gradients included."""
from __future__ import annotations

import pytest
import torch

from mm_llama.train.losses import IGNORE, labelled_loss_sum, lm_loss_sum
from mm_llama.train.tasks.dpo import labelled_logps, sequence_logps
from serve_helpers import VOCAB, speech_model, text_model, vision_model


def labels_for(tokens: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """About a third of the positions labelled, one row with none."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, VOCAB, tokens.shape, generator=g)
    labels[torch.rand(tokens.shape, generator=g) > 0.35] = IGNORE
    labels[-1] = IGNORE
    labels[0, 2] = 7
    return labels


def image_inputs(batch: int) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"images": torch.randn(batch, 1, 2, 3, 28, 28, generator=g),
            "aspect_ratios": torch.tensor([[1, 2]]).expand(batch, 1, 2).clone()}


def speech_inputs(batch: int) -> dict:
    g = torch.Generator().manual_seed(4)
    return {"speech_feats": torch.randn(batch, 40, 80, generator=g), "speech_lengths": torch.tensor([40, 24, 32])[:batch]}


CASES = {
    "text": (text_model, lambda b: {}, 200),
    "image": (vision_model, image_inputs, 200),
    "speech": (speech_model, speech_inputs, 200),
}


def tokens_for(kind: str, model, batch: int = 3, seq: int = 14) -> torch.Tensor:
    tokens = torch.randint(0, CASES[kind][2], (batch, seq), generator=torch.Generator().manual_seed(1))
    if kind == "image":
        tokens[:, 1] = model.image_token_id
    if kind == "speech":  # each row: text, then its clip's placeholders between start and end, then text
        with torch.no_grad():
            inputs = speech_inputs(batch)
            _, lengths = model.encode_speech(inputs["speech_feats"], inputs["speech_lengths"])
        ids = model.speech_ids
        tokens = torch.cat([tokens, torch.randint(0, 200, (batch, int(lengths.max()) + 2))], 1)
        for row, n in enumerate(lengths.tolist()):
            tokens[row, 4:6 + n] = torch.tensor([ids.start, *[ids.speech] * n, ids.end])
    return tokens


@pytest.mark.parametrize("kind", CASES)
def test_logits_at_are_the_full_logits_rows(kind):
    build, extra, _ = CASES[kind]
    model = build()
    tokens = tokens_for(kind, model)
    at = labels_for(tokens) != IGNORE
    with torch.no_grad():
        full = model(tokens, **extra(3))
        picked = model(tokens, logits_at=at, **extra(3))
    assert picked.shape == (int(at.sum()), full.shape[-1])
    torch.testing.assert_close(picked, full[at], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", CASES)
def test_labelled_loss_and_gradients_equal_the_full_logits_loss(kind):
    build, extra, _ = CASES[kind]
    grads = []
    losses = []
    for fast in (False, True):
        model = build().train()
        tokens = tokens_for(kind, model)
        labels = labels_for(tokens)
        loss = labelled_loss_sum(model, tokens, labels, **extra(3)) if fast else \
            lm_loss_sum(model(tokens, **extra(3)), labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_labelled_logps_equal_sequence_logps_per_row():
    model = text_model()
    tokens = tokens_for("text", model, batch=4)
    labels = labels_for(tokens)
    with torch.no_grad():
        want, want_counts = sequence_logps(model(tokens), labels)
        got, counts = labelled_logps(model, tokens, labels)
    assert counts.tolist() == want_counts.tolist() and counts[-1] == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[-1] == 0  # a row without labels sums nothing

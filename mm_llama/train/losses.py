"""Training objectives on logits."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions; logits `[batch, seq, vocab]`, labels `[batch, seq]`.

    Summed, not averaged, so gradient accumulation can divide by the token count of the whole step.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


@functools.cache  # built on first use: importing the compiler costs seconds that a run without `compile` never pays
def compiled_lm_loss_sum():
    """`lm_loss_sum` under `torch.compile`: the fp32 cast, log-softmax and their backward fused into passes over
    the bf16 logits, instead of vocabulary-sized fp32 copies written and read several times (`train.compile`)."""
    return torch.compile(lm_loss_sum)


def labelled_loss_sum(model, tokens: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """`lm_loss_sum` of `model(tokens, **inputs)` with logits computed only where `labels` `[batch, seq]` has a label
    (the model's `logits_at`): SFT, answers and transcripts label a fraction of the positions."""
    at = labels != IGNORE
    return F.cross_entropy(model(tokens, logits_at=at, **inputs).float(), labels[at], reduction="sum")


def caption_contrastive_loss(media: torch.Tensor, text: torch.Tensor, same: torch.Tensor, temperature: float
                             ) -> torch.Tensor:
    """Symmetric InfoNCE between media and caption vectors `[n, dim]` (cosine similarity / temperature).

    `same` bool `[n, n]`: pairs with equal captions, all of which count as positives (a batch of a small
    caption vocabulary holds many), so a clip is not pushed away from its own caption's twins.
    """
    sim = F.normalize(media.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / temperature
    target = same.float() / same.float().sum(1, keepdim=True)
    return -0.5 * ((target * sim.log_softmax(1)).sum(1).mean() + (target * sim.log_softmax(0).T).sum(1).mean())

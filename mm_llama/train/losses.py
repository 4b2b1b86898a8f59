"""Training objectives on logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled positions; logits `[batch, seq, vocab]`, labels `[batch, seq]`.

    Summed, not averaged, so gradient accumulation can divide by the token count of the whole step.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")

"""Held-out language-model metrics and their blind baseline (a unigram model of the training stream)."""
from __future__ import annotations

import math

import torch

from ..data import DataConfig, TextLoader, heldout_batches
from ..train.losses import lm_loss_sum


def unigram_loss(cfg: DataConfig, tokenizer, batches, seq_len: int, train_batches: int = 64, seed: int = 0) -> float:
    """Cross-entropy per token of held-out labels under add-one-smoothed training token frequencies."""
    counts = torch.ones(tokenizer.n_words, dtype=torch.float64)
    stream = iter(TextLoader(cfg, tokenizer, seq_len=seq_len, batch_size=8, seed=seed))
    for _ in range(train_batches):
        labels = next(stream).labels
        counts += torch.bincount(labels[labels >= 0], minlength=tokenizer.n_words).double()
    logp = (counts / counts.sum()).log()
    total, n = 0.0, 0
    for b in batches:
        labels = b.labels[b.labels >= 0]
        total -= float(logp[labels].sum())
        n += labels.numel()
    return total / max(n, 1)


@torch.no_grad()
def heldout_loss(model, batches) -> float:
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        total += float(lm_loss_sum(model(b.tokens, doc_ids=b.doc_ids), b.labels))
        n += int((b.labels >= 0).sum())
    return total / max(n, 1)


def text_metrics(model, cfg: DataConfig, tokenizer, seq_len: int = 256, max_batches: int = 16) -> dict[str, float]:
    """`heldout_loss`, `heldout_ppl` and their unigram baselines on the config's held-out sources."""
    if not cfg.heldout:
        raise ValueError("data.heldout is empty: no held-out text to evaluate on")
    batches = heldout_batches(cfg, tokenizer, seq_len, 4, max_batches)
    loss, base = heldout_loss(model, batches), unigram_loss(cfg, tokenizer, batches, seq_len)
    return {"heldout_loss": loss, "heldout_loss_baseline": base,
            "heldout_ppl": math.exp(loss), "heldout_ppl_baseline": math.exp(base)}

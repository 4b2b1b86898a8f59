"""Attention masks: causal, and block-diagonal causal over packed documents.

Decision (SPEC §1.1 leaves it open): rotary positions restart at 0 at every document start,
so a document packed into a long row sees exactly what it would see alone; the test suite
checks that packed logits equal per-document logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMask:
    """What `scaled_dot_product_attention` needs: either `is_causal` or an explicit boolean mask.

    `dense` is `[batch, 1, q_len, kv_len]`, True where attention is allowed; built once per batch
    and shared by every layer.
    """

    dense: torch.Tensor | None = None

    @property
    def is_causal(self) -> bool:
        return self.dense is None


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document `[batch, seq]` from document ids `[batch, seq]`."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def document_mask(doc_ids: torch.Tensor) -> AttentionMask:
    """Block-diagonal causal mask: token i sees token j iff j <= i and both lie in one document."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return AttentionMask((same_doc & causal)[:, None])


def offset_causal_mask(q_len: int, start_pos: int, device=None) -> AttentionMask:
    """Causal mask for `q_len` new tokens after `start_pos` cached ones, `[1, 1, q_len, start_pos+q_len]`."""
    if start_pos == 0:
        return AttentionMask()
    q = torch.arange(start_pos, start_pos + q_len, device=device)[:, None]
    k = torch.arange(start_pos + q_len, device=device)[None, :]
    return AttentionMask((k <= q)[None, None])

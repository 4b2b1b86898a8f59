"""Context parallelism the paper's way (SPEC §2.4): all-gather K and V, attend with the local queries.

The sequence is cut into 2·cp chunks and rank i keeps chunks i and 2·cp−1−i, so every rank holds
an equal share of the causal triangle's work. Each block computes q, k, v for its own tokens,
all-gathers k and v over the CP group (small under GQA) and runs attention for its queries against
the whole sequence with an explicit mask, so any mask — the document mask included — is exact.
(torch's experimental ring `context_parallel` supports only plain causal masks.)

Installed on an unmodified `Transformer`: its `prepare` is replaced (on the instance) by one that
builds rotary tables and mask rows for the local tokens from the *full* document ids, and each
attention module's `forward` by the all-gather version. Parameter names do not change.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_tensor_autograd
from torch.distributed.device_mesh import DeviceMesh

from ..config import ConfigError
from ..model.masks import AttentionMask, document_positions
from ..model.rope import apply_rotary


def local_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Sequence positions `[seq_len / cp]` held by CP rank `rank`: chunks `rank` and `2·cp−1−rank`."""
    if seq_len % (2 * cp):
        raise ConfigError(f"train.seq_len ({seq_len}) must be a multiple of 2·parallel.cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    idx = torch.arange(seq_len, device=device).view(2 * cp, chunk)
    return torch.cat([idx[rank], idx[2 * cp - 1 - rank]])


def gathered_index(seq_len: int, cp: int, device=None) -> torch.Tensor:
    """Sequence positions `[seq_len]` of the keys in all-gather order (rank 0's tokens, then rank 1's, ...)."""
    return torch.cat([local_index(seq_len, cp, r, device) for r in range(cp)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's tokens of `x` `[batch, seq, ...]` → `[batch, seq / cp, ...]`."""
    return x[:, local_index(x.shape[1], cp, rank, x.device)]


def _prepare(model: nn.Module, cp: int, rank: int):
    def prepare(tokens: torch.Tensor, doc_ids=None, positions=None, start_pos: int = 0):
        """tokens `[batch, seq/cp]` (local), doc_ids `[batch, seq]` (full) → local rotary, mask `[batch, 1, seq/cp, seq]`."""
        if start_pos or positions is not None:
            raise ValueError("context parallelism is for training: no KV cache or explicit positions")
        b, t = tokens.shape[0], tokens.shape[1] * cp
        if doc_ids is None:
            doc_ids = torch.zeros(b, t, dtype=torch.long, device=tokens.device)
        q_at = local_index(t, cp, rank, tokens.device)
        k_at = gathered_index(t, cp, tokens.device)
        cos, sin = model.rotary(document_positions(doc_ids)[:, q_at])
        same_doc = doc_ids[:, q_at, None] == doc_ids[:, None, k_at]
        causal = k_at[None, :] <= q_at[:, None]
        return (cos, sin), AttentionMask((same_doc & causal)[:, None])

    return prepare


def _all_gather_attention(group: DeviceMesh):
    def forward(self, x, cos, sin, mask: AttentionMask, cache=None, start_pos: int = 0):
        """x `[batch, seq/cp, dim]` → `[batch, seq/cp, dim]`; keys and values from every CP rank."""
        b, t, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [batch, heads, seq/cp, head_dim]
        k = all_gather_tensor_autograd(k.contiguous(), gather_dim=2, group=group)  # [batch, kv_heads, seq, head_dim]
        v = all_gather_tensor_autograd(v.contiguous(), gather_dim=2, group=group)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    return forward


def apply_cp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Install all-gather context parallelism on a `Transformer` in place (see the module docstring)."""
    cp, rank = mesh.size(), mesh.get_local_rank()
    model.prepare = _prepare(model, cp, rank)
    attend = _all_gather_attention(mesh)
    for block in model.layers:
        block.attention.forward = types.MethodType(attend, block.attention)

"""Preallocated key/value cache for one attention layer."""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Keys and values `[batch, kv_heads, max_len, head_dim]`, filled in place as tokens arrive."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v `[batch, kv_heads, seq, head_dim]` at `start_pos`; return everything cached so far."""
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; asked to write up to {end}")
        self.k[: k.shape[0], :, start_pos:end] = k
        self.v[: v.shape[0], :, start_pos:end] = v
        return self.k[: k.shape[0], :, :end], self.v[: v.shape[0], :, :end]

"""Token generation with a preallocated KV cache: greedy, temperature, top-k and top-p sampling."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..model import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids `[batch]` from last-position logits `[batch, vocab]`; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, stop_tokens: set[int] = frozenset(),
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue one prompt; returns the new tokens (without the stop token). `on_token` streams each token."""
    a = model.args
    total = len(prompt) + max_new_tokens
    if total > a.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len {a.max_seq_len}")
    device = model.tok_embeddings.weight.device
    dtype = model.tok_embeddings.weight.dtype
    caches = [KVCache(1, a.kv_heads, total, a.head_dim, dtype=dtype, device=device) for _ in range(a.n_layers)]
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    model.eval()
    logits = model(torch.tensor([prompt], device=device), caches=caches)
    out: list[int] = []
    pos = len(prompt)
    for _ in range(max_new_tokens):
        nxt = int(sample_next(logits[:, -1], temperature, top_k, top_p, generator))
        if nxt in stop_tokens:
            break
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        logits = model(torch.tensor([[nxt]], device=device), caches=caches, start_pos=pos)
        pos += 1
    return out

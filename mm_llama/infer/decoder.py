"""One cached forward pass of the LM (or the composed image–text model) under an explicit attention mask.

`Transformer.forward` builds its own causal mask, which cannot leave out the left padding of a batch
of prompts of different lengths; the model's parts take the mask as an argument, so this module runs
them with a padding-aware one. It returns only the last position's logits: generation needs nothing
else, and the vocabulary projection of a whole prompt is a large share of a small model's prefill.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.cross_attention import cross_attention_bias
from ..model import KVCache, Transformer
from ..model.masks import AttentionMask
from ..model.multimodal import ImageContext, MultimodalModel
from ..model.rope import inv_frequencies, rotary_tables


@dataclass
class CrossInputs:
    """Image keys/values (computed once per request) and which tiles each query row may see.

    bias `[batch, 1, seq, n_image_tokens]`, rows `[batch, seq, 1]` from `cross_attention_bias`.
    """

    context: ImageContext
    bias: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def from_mask(cls, context: ImageContext, vision_mask: torch.Tensor, dtype) -> "CrossInputs":
        """vision_mask bool `[batch, seq, n_images, max_tiles]`."""
        bias, rows = cross_attention_bias(vision_mask, context.tokens.shape[3], dtype)
        return cls(context, bias, rows)


def padded_attention_mask(valid: torch.Tensor, start: int, q_len: int) -> AttentionMask:
    """Causal mask over cache slots `[0, start + q_len)` that ignores padding slots.

    valid bool `[batch, cache_len]`: True where a slot holds a real token. Query slot q sees key slot
    k iff k <= q and k is real; a padding query also sees itself, so that its softmax stays finite.
    Returns a dense mask `[batch, 1, q_len, start + q_len]`.
    """
    device = valid.device
    q = torch.arange(start, start + q_len, device=device)[:, None]
    k = torch.arange(start + q_len, device=device)[None, :]
    allowed = (valid[:, None, : start + q_len] & (k <= q)) | (k == q)
    return AttentionMask(allowed[:, None])


class Decoder:
    """Runs `Transformer` or `MultimodalModel` layers on embeddings with caches and a given mask."""

    def __init__(self, model: Transformer | MultimodalModel):
        self.multimodal = model if isinstance(model, MultimodalModel) else None
        self.lm: Transformer = model.lm if self.multimodal is not None else model
        if not isinstance(self.lm, Transformer):
            raise TypeError(f"expected a Transformer or MultimodalModel, got {type(model).__name__}")
        self.args = self.lm.args
        weight = self.lm.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.inv_freq = inv_frequencies(self.args, device=self.device)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[batch, seq]` → `[batch, seq, dim]` (the composed model embeds `<|image|>` itself)."""
        return self.multimodal.embed(tokens) if self.multimodal is not None else self.lm.tok_embeddings(tokens)

    def caches(self, batch: int, length: int) -> list[KVCache]:
        a = self.args
        return [KVCache(batch, a.kv_heads, length, a.head_dim, dtype=self.dtype, device=self.device)
                for _ in range(a.n_layers)]

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, mask: AttentionMask, caches: list[KVCache],
                 start: int, cross: CrossInputs | None = None) -> torch.Tensor:
        """h `[batch, seq, dim]` at cache slots `[start, start + seq)`, positions `[batch, seq]` →
        logits of the last position `[batch, vocab]` (fp32)."""
        cos, sin = rotary_tables(positions, self.inv_freq)
        blocks = self.multimodal.cross_attention if self.multimodal is not None and cross is not None else {}
        for i, layer in enumerate(self.lm.layers):
            if str(i) in blocks:
                h = blocks[str(i)](h, cross.context.kv[str(i)], cross.bias, cross.rows)
            h = layer(h, cos, sin, mask, caches[i], start)
        return self.lm.output(self.lm.norm(h[:, -1])).float()

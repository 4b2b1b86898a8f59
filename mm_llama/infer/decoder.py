"""One cached forward pass of the LM (or a composed image or speech model) under an explicit attention mask.

`Transformer.forward` builds its own causal mask, which cannot leave out the left padding of a batch
of prompts of different lengths; the model's parts take the mask as an argument, so this module runs
them with a padding-aware one. It returns only the last position's logits: generation needs nothing
else, and the vocabulary projection of a whole prompt is a large share of a small model's prefill.

Decoding one token at a time (`Decoder.step`) runs the same arithmetic as the blocks with fewer small
operations: at batch 1 a ~30M model spends a third of each step outside its matrix products, mostly in
per-operation overhead. The rotation of every layer's queries and keys is built once per step (the
blocks rebuild it twice per layer), and fp32 RMSNorm is one fused `rms_norm` (the model's autograd
function, written for training's backward, costs several operations and a Python call).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapters.cross_attention import cross_attention_bias
from ..model import KVCache, Transformer
from ..model.masks import AttentionMask
from ..model.multimodal import ImageContext, MultimodalModel, VideoContext
from ..model.speech_lm import SpeechLM
from ..model.rope import apply_rotary_real, inv_frequencies, rotary_tables


@dataclass
class CrossInputs:
    """Image (or video) keys/values, computed once per request, and which media tokens each query row may see.

    bias `[batch, 1, seq, n_media_tokens]`, rows `[batch, seq, 1]` from `cross_attention_bias`.
    """

    context: ImageContext | VideoContext
    bias: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def from_mask(cls, context: ImageContext | VideoContext, vision_mask: torch.Tensor, dtype) -> "CrossInputs":
        """vision_mask bool `[batch, seq, n_images, max_tiles]` (videos: `[batch, seq, n_videos, groups]`)."""
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
    """Runs the layers of a `Transformer`, `MultimodalModel` or `SpeechLM` on embeddings with caches and a
    given mask (a speech model's LM runs as it is: its speech frames are spliced into the embeddings)."""

    def __init__(self, model: Transformer | MultimodalModel | SpeechLM):
        self.multimodal = model if isinstance(model, MultimodalModel) else None
        self.speech = model if isinstance(model, SpeechLM) else None
        self.lm: Transformer = model if isinstance(model, Transformer) else getattr(model, "lm", None)
        if not isinstance(self.lm, Transformer):
            raise TypeError(f"expected a Transformer, MultimodalModel or SpeechLM, got {type(model).__name__}")
        self.args = self.lm.args
        weight = self.lm.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.inv_freq = inv_frequencies(self.args, device=self.device)
        self._compiled = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[batch, seq]` → `[batch, seq, dim]` (the composed model embeds `<|image|>` itself)."""
        return self.multimodal.embed(tokens) if self.multimodal is not None else self.lm.tok_embeddings(tokens)

    def caches(self, batch: int, length: int) -> list[KVCache]:
        a = self.args
        return [KVCache(batch, a.kv_heads, length, a.head_dim, dtype=self.dtype, device=self.device)
                for _ in range(a.n_layers)]

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, mask: AttentionMask, caches: list[KVCache],
                 start: int, cross: CrossInputs | None = None, video: CrossInputs | None = None) -> torch.Tensor:
        """h `[batch, seq, dim]` at cache slots `[start, start + seq)`, positions `[batch, seq]` →
        logits of the last position `[batch, vocab]` (fp32). Video cross-attention runs before the image
        block of the same layer, as in `MultimodalModel.forward`."""
        cos, sin = rotary_tables(positions, self.inv_freq)
        blocks = self.multimodal.cross_attention if self.multimodal is not None and cross is not None else {}
        video_blocks = self.multimodal.video_cross_attention if self.multimodal is not None and video is not None else {}
        for i, layer in enumerate(self.lm.layers):
            if str(i) in video_blocks:
                h = video_blocks[str(i)](h, video.context.kv[str(i)], video.bias, video.rows)
            if str(i) in blocks:
                h = blocks[str(i)](h, cross.context.kv[str(i)], cross.bias, cross.rows)
            h = layer(h, cos, sin, mask, caches[i], start)
        return self.lm.output(self.lm.norm(h[:, -1])).float()

    def step(self, h: torch.Tensor, positions: torch.Tensor, mask: AttentionMask, caches: list[KVCache],
             start: int) -> torch.Tensor:
        """`self(...)` without cross-attention, in fewer operations: the prompt (`start` 0) or one new token per
        row, h `[batch, seq, dim]` at cache slots `[start, start + seq)`, positions `[batch, seq]` → logits of the
        last position `[batch, vocab]` (fp32); equal to `self(...)` up to rounding (tested)."""
        if mask.dense is None and h.shape[1] > 1 and start != 0:
            raise ValueError("a causal mask without a dense mask covers a prompt at cache slot 0 only")

        def attend_to(i: int, k: torch.Tensor, v: torch.Tensor):
            return (*caches[i].update(k, v, start), mask.dense)

        return self._decode(h, positions, attend_to)

    def static_step(self, tokens: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
                    keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor) -> torch.Tensor:
        """`step` with the same shapes at every step, for `torch.compile(dynamic=False)`: tokens and positions
        `[batch, 1]`, the cache tensors `[batch, kv_heads, cache_len, head_dim]` written at `slot` (`[1]`,
        a tensor), attention over the whole cache under `valid` `[batch, cache_len]` and key slot <= `slot`."""
        allowed = (valid & (torch.arange(valid.shape[1], device=valid.device) <= slot))[:, None, None, :]

        def attend_to(i: int, k: torch.Tensor, v: torch.Tensor):
            keys[i].index_copy_(2, slot, k)
            values[i].index_copy_(2, slot, v)
            return keys[i], values[i], allowed

        return self._decode(self.embed(tokens), positions, attend_to, complex_rotation=False)

    def compiled_step(self):
        """`static_step` compiled (once per batch size and cache length); compilation happens at the first call."""
        if self._compiled is None:
            self._compiled = torch.compile(self.static_step, dynamic=False)
        return self._compiled

    def _decode(self, h: torch.Tensor, positions: torch.Tensor, attend_to, complex_rotation: bool = True
                ) -> torch.Tensor:
        """The blocks on `seq` positions per row; `attend_to(layer, k, v)` stores the new keys/values
        `[batch, kv_heads, seq, head_dim]` and returns (keys, values, mask) to attend over (mask None: causal,
        the keys being exactly these positions). The rotation is
        one complex multiply in eager mode, and written out in real numbers (the same products and sums)
        for the compiler, which generates no code for complex numbers."""
        b, t = h.shape[:2]
        angles = positions.to(torch.float32)[..., None, None] * self.inv_freq  # [batch, seq, 1, head_dim // 2]
        if complex_rotation:
            rotation = torch.polar(torch.ones_like(angles), angles)  # cos + i·sin
            rotate = lambda x: _rotate(x, rotation)  # noqa: E731
        else:
            cos, sin = angles.cos(), angles.sin()
            rotate = lambda x: apply_rotary_real(x, cos, sin)  # noqa: E731
        for i, layer in enumerate(self.lm.layers):
            attn = layer.attention
            x = self._norm(layer.attention_norm, h)
            q = rotate(attn.wq(x).view(b, t, attn.n_heads, attn.head_dim))
            k = rotate(attn.wk(x).view(b, t, attn.n_kv_heads, attn.head_dim))
            v = attn.wv(x).view(b, t, attn.n_kv_heads, attn.head_dim)
            keys, values, mask = attend_to(i, k.transpose(1, 2), v.transpose(1, 2))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 is_causal=mask is None and t > 1,
                                                 enable_gqa=attn.n_kv_heads != attn.n_heads)
            h = h + attn.wo(out.transpose(1, 2).reshape(b, t, -1))
            ffn = layer.feed_forward
            x = self._norm(layer.ffn_norm, h)
            h = h + ffn.w2(F.silu(ffn.w1(x)) * ffn.w3(x))
        return self.lm.output(self._norm(self.lm.norm, h[:, -1])).float()

    @staticmethod
    def _norm(norm, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
            return F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
        return norm(x)


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`x` `[batch, seq, heads, head_dim]` with adjacent pairs rotated by `rotation` (complex), in fp32 —
    `model.rope.apply_rotary`'s arithmetic with the complex rotation made once."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


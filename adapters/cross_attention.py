"""Gated cross-attention from text to image tokens (SPEC §4.1, §4.3; Meta's `CrossAttentionTransformerBlock`).

    h   = x + tanh(gate_attn) · rowmask · XAttn(RMSNorm(x))
    out = h + tanh(gate_ffwd) · rowmask · FFN(RMSNorm(h))

XAttn is grouped-query attention with the LM's head counts, RMSNorm on each query and key head, and
no rotary embedding. Both gates start at zero, so a fresh block is the identity. `rowmask` is 0 for
text positions that can see no image yet (text before the first `<|image|>`): they get nothing from
either branch. K/V depend only on the image, so `kv()` is computed once per image and reused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.model.args import LlamaArgs
from mm_llama.model.llama import FeedForward, RMSNorm


def fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """LM layers a cross-attention block runs before: every k-th from the top, k = ceil(n_layers / n_cross).

    Meta's rule; 32 layers, 8 blocks → [3, 7, 11, …, 31]; 80 layers, 20 blocks → [3, 7, …, 79].
    """
    if not 0 < n_cross <= n_layers:
        raise ValueError(f"need 1..{n_layers} cross-attention layers, got {n_cross}")
    k = -(-n_layers // n_cross)
    layers = list(range(n_layers))[::-1][::k][:n_cross][::-1]
    if len(layers) < n_cross:
        raise ValueError(f"Meta's spacing (every {k}th of {n_layers} layers) gives only {len(layers)} places for "
                         f"{n_cross} cross-attention layers; list cross_attention_layers explicitly")
    return layers


def image_spans(tokens: list[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) text positions that see each image, one per `<|image|>` in `tokens`.

    An image is visible from its own token up to the next image token; the last one to the end.
    Consecutive image tokens (several images, then their text) all stay visible through that text.
    """
    at = [i for i, t in enumerate(tokens) if t == image_token_id]
    spans = [[s, e] for s, e in zip(at, [*at[1:], len(tokens)])]
    for j in range(len(spans) - 2, -1, -1):
        if spans[j][1] == spans[j][0] + 1:  # directly followed by another image token
            spans[j][1] = spans[j + 1][1]
    return [(s, e) for s, e in spans]


def vision_mask(tokens: torch.Tensor, image_token_id: int, aspect_ratios: torch.Tensor, max_tiles: int
                ) -> torch.Tensor:
    """Which tiles each text position may attend to: bool `[batch, seq, n_images, max_tiles]`.

    tokens `[batch, seq]` (the whole sequence); aspect_ratios `[batch, n_images, 2]` (rows, cols), one
    per `<|image|>` in order, (0, 0) for empty slots. Only an image's real tiles are visible. This is
    `transformers`' `cross_attention_mask` as a bool tensor.
    """
    b, t = tokens.shape
    n_images = aspect_ratios.shape[1]
    n_tiles = (aspect_ratios[..., 0] * aspect_ratios[..., 1]).tolist()
    mask = torch.zeros(b, t, n_images, max_tiles, dtype=torch.bool, device=tokens.device)
    for i, row in enumerate(tokens.tolist()):
        spans = image_spans(row, image_token_id)
        if len(spans) > n_images:
            raise ValueError(f"sample {i} has {len(spans)} <|image|> tokens but only {n_images} image slots")
        for j, (s, e) in enumerate(spans):
            if n_tiles[i][j] == 0:
                raise ValueError(f"sample {i}: <|image|> number {j + 1} has no image (aspect ratio (0, 0))")
            mask[i, s:e, j, : n_tiles[i][j]] = True
    return mask


def cross_attention_bias(mask: torch.Tensor, tokens_per_tile: int, dtype=torch.float32
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """bool `[batch, seq, n_images, tiles]` → (additive bias `[batch, 1, seq, n_images·tiles·tokens]`,
    row mask `[batch, seq, 1]`, 1 where the position sees at least one image).

    Rows that see nothing attend everywhere (so softmax stays finite); the row mask zeroes them.
    """
    b, t = mask.shape[:2]
    rows = mask.flatten(2).any(-1)
    allowed = mask.repeat_interleave(tokens_per_tile, dim=3).view(b, t, -1) | ~rows[..., None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None], rows[..., None].to(dtype)


class CrossAttention(nn.Module):
    """Text queries `[batch, seq, dim]` over image keys/values; GQA, per-head QK RMSNorm, no RoPE."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps)

    def kv(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image tokens `[batch, n_img_tokens, dim]` → K (normed), V `[batch, kv_heads, n_img_tokens, head_dim]`."""
        b, s, _ = image_tokens.shape
        k = self.k_norm(self.wk(image_tokens).view(b, s, self.n_kv_heads, self.head_dim))
        v = self.wv(image_tokens).view(b, s, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor) -> torch.Tensor:
        """x `[batch, seq, dim]`, bias `[batch, 1, seq, n_img_tokens]` → `[batch, seq, dim]`."""
        b, t, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k, v = kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class CrossAttentionBlock(nn.Module):
    """One gated cross-attention block, sized like an LM block (SwiGLU of the LM's width).

    `mask_attention_rows=False` leaves the attention branch of image-less rows unmasked, which is what
    `transformers`' Mllama does (those rows attend uniformly to every image token); use it only to
    reproduce that implementation.
    """

    def __init__(self, args: LlamaArgs, mask_attention_rows: bool = True):
        super().__init__()
        self.attention = CrossAttention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))
        self.mask_attention_rows = mask_attention_rows

    def kv(self, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values for `image_tokens` `[batch, n_img_tokens, dim]`; compute once per image."""
        return self.attention.kv(image_tokens)

    def forward(self, x, kv, bias, row_mask) -> torch.Tensor:
        """x `[batch, seq, dim]`; bias, row_mask from `cross_attention_bias` → `[batch, seq, dim]`."""
        attn = self.attention(self.attention_norm(x), kv, bias)
        if self.mask_attention_rows:
            attn = attn * row_mask
        h = x + self.gate_attn.tanh() * attn
        return h + self.gate_ffwd.tanh() * (row_mask * self.feed_forward(self.ffn_norm(h)))

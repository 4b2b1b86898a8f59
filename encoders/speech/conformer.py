"""The speech encoder (SPEC §5.2): stride-4 frame stacking + linear projection, then Conformer blocks.

Each block (Gulati et al. 2020) is `½·FFN → rotary self-attention → convolution module → ½·FFN → LayerNorm`,
every part residual. Positions enter only through rotary embeddings on queries and keys (the project's
`mm_llama.model.rope`), so attention scores depend on relative offsets alone. The convolution module's
internals are not published (SPEC §7): we use pointwise conv + GLU → depthwise conv → LayerNorm → Swish →
pointwise conv, with LayerNorm in place of the original BatchNorm so that a frame's output never depends on
the other utterances in the batch or on padding (a padded batch gives the unpadded outputs, in training too).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_llama.model.rope import apply_rotary, rotary_tables

from .args import ConformerArgs


def rotary_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """Unscaled rotary frequencies `[head_dim // 2]`: θ^(−2i/head_dim) (Llama's without 3.1 scaling)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """bool `[batch, max_len]`: True at the first `lengths[b]` frames of row b."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def stack_frames(feats: torch.Tensor, stack: int) -> torch.Tensor:
    """`[batch, frames, n_mels]` → `[batch, frames // stack, stack · n_mels]`; a last partial stack is dropped."""
    b, t, d = feats.shape
    t = t // stack
    return feats[:, : t * stack].reshape(b, t, stack * d)


def encoder_lengths(feature_lengths: torch.Tensor | int, stack: int):
    """Encoder frames for `feature_lengths` log-mel frames (int or tensor)."""
    return feature_lengths // stack


class FeedForward(nn.Module):
    """`Linear → Swish → dropout → Linear → dropout`: `[batch, seq, dim]` → `[batch, seq, dim]`."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(self.dropout(F.silu(self.w1(x)))))


class RotarySelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary queries and keys; padded keys are masked out."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """x `[batch, seq, dim]`, cos/sin `[batch, seq, 1, head_dim // 2]`, valid bool `[batch, seq]` → `[batch, seq, dim]`."""
        b, t, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_heads, self.head_dim)
        mask = None if valid is None else valid[:, None, None, :]  # [batch, 1, 1, keys]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.dropout(self.wo(out.transpose(1, 2).reshape(b, t, -1)))


class ConvModule(nn.Module):
    """`LayerNorm → pointwise conv (2·dim) → GLU → depthwise conv (kernel k) → LayerNorm → Swish → pointwise conv → dropout`."""

    def __init__(self, dim: int, kernel: int, dropout: float, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_in = nn.Conv1d(dim, 2 * dim, 1)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.depthwise_norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_out = nn.Conv1d(dim, dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """x `[batch, seq, dim]` → `[batch, seq, dim]`; padded frames are zeroed before the depthwise conv so
        they read as the conv's own zero padding."""
        h = F.glu(self.pointwise_in(self.norm(x).transpose(1, 2)), dim=1)  # [batch, dim, seq]
        if valid is not None:
            h = h * valid[:, None, :]
        h = self.depthwise(h).transpose(1, 2)
        h = self.pointwise_out(F.silu(self.depthwise_norm(h)).transpose(1, 2)).transpose(1, 2)
        return self.dropout(h)


class ConformerBlock(nn.Module):
    """Macaron Conformer block: `x + ½ FFN`, `+ MHSA`, `+ Conv`, `+ ½ FFN`, then LayerNorm."""

    def __init__(self, args: ConformerArgs):
        super().__init__()
        d, eps = args.dim, args.norm_eps
        self.ffn1_norm = nn.LayerNorm(d, eps=eps)
        self.ffn1 = FeedForward(d, args.ffn_dim, args.dropout)
        self.attention_norm = nn.LayerNorm(d, eps=eps)
        self.attention = RotarySelfAttention(d, args.n_heads, args.dropout)
        self.conv = ConvModule(d, args.conv_kernel, args.dropout, eps)
        self.ffn2_norm = nn.LayerNorm(d, eps=eps)
        self.ffn2 = FeedForward(d, args.ffn_dim, args.dropout)
        self.norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x, cos, sin, valid: torch.Tensor | None) -> torch.Tensor:
        """x `[batch, seq, dim]` → `[batch, seq, dim]`."""
        x = x + 0.5 * self.ffn1(self.ffn1_norm(x))
        x = x + self.attention(self.attention_norm(x), cos, sin, valid)
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ffn2(self.ffn2_norm(x))
        return self.norm(x)


class ConformerEncoder(nn.Module):
    """`forward(feats [batch, frames, n_mels], lengths [batch])` → (`[batch, frames // stack, dim]`, lengths `[batch]`).

    Padded output frames are zero.
    """

    def __init__(self, args: ConformerArgs):
        super().__init__()
        self.args = args
        self.input_proj = nn.Linear(args.stack * args.n_mels, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(ConformerBlock(args) for _ in range(args.n_layers))

    def rotary(self, n: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[batch, n, 1, head_dim // 2]` for positions 0..n−1."""
        positions = torch.arange(n, device=device).expand(batch, n)
        return rotary_tables(positions, rotary_frequencies(self.args.head_dim, self.args.rope_theta, device))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if feats.dim() != 3 or feats.shape[-1] != self.args.n_mels:
            raise ValueError(f"speech features must be [batch, frames, {self.args.n_mels}], got {list(feats.shape)}")
        b = feats.shape[0]
        if lengths is None:
            lengths = torch.full((b,), feats.shape[1], dtype=torch.long, device=feats.device)
        x = self.dropout(self.input_proj(stack_frames(feats, self.args.stack)))
        out_lengths = encoder_lengths(lengths, self.args.stack)
        if bool((out_lengths < 1).any()):
            raise ValueError(f"every utterance needs at least {self.args.stack} feature frames, got lengths {lengths.tolist()}")
        valid = valid_mask(out_lengths, x.shape[1])
        cos, sin = self.rotary(x.shape[1], b, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, valid)
        return x * valid[..., None], out_lengths

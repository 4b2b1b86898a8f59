"""Rotary position embeddings with Llama 3.1 frequency scaling (SPEC §1.3–1.4).

Meta rotates *adjacent* pairs (x[2i], x[2i+1]) as one complex number; we keep that layout so
released weights load unchanged.
"""
from __future__ import annotations

import math

import torch

from .args import LlamaArgs


def inv_frequencies(args: LlamaArgs, device=None) -> torch.Tensor:
    """Per-pair rotation frequencies `[head_dim // 2]`, scaled as Llama 3.1 when enabled."""
    d = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, device=device)[: d // 2].float() / d))
    if args.use_scaled_rope:
        freqs = apply_scaling(freqs, args)
    return freqs


def apply_scaling(freqs: torch.Tensor, args: LlamaArgs) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short kept, smooth in between."""
    factor, low, high = args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_len = args.rope_original_context
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > low_freq_wavelen, freqs / factor, blended)
    return torch.where(wavelen < high_freq_wavelen, freqs, out)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[batch, seq, 1, head_dim // 2]` for integer `positions` `[batch, seq]`."""
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[batch, seq, heads, head_dim]` pairwise; computed in fp32 as Meta does.

    Each pair is one complex number multiplied by `cos + i·sin`, exactly Meta's formulation; one
    complex multiply is several times faster forward and backward than the real-valued split in eager
    mode. Under `torch.compile` the real-valued form is used instead: Inductor generates no code for
    complex operators, while it fuses the real form into one kernel.
    """
    if torch.compiler.is_compiling():
        return apply_rotary_real(x, cos, sin)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.complex(cos.float(), sin.float())).flatten(-2).type_as(x)


def apply_rotary_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` spelled with real arithmetic: (a + ib)(c + is) = (ac − bs) + i(as + bc)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.float(), sin.float()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)

"""The video adapter's temporal aggregator and the video visibility rule (SPEC §4.1 "Video adapter").

Every frame goes through the image encoder; a perceiver resampler (Flamingo's, Alayrac et al. 2022)
then merges each group of `frames_per_group` consecutive frames into one aggregated frame:

    x       = frame tokens of the group + time_embedding[frame index in the video]   [G·tiles·tokens, dim]
    gain    = (1 + time_gain[frame index]) · (1 + slot_gain[token slot])              [G·tiles·tokens, dim]
    latents = learned queries                                                          [n_latents, dim]
    per layer:  latents += Attn(q = LN(latents), kv = [LN(x) · gain; LN(latents)])
                latents += FFN(LN(latents))
    out     = LN(latents)                                                              [n_latents, dim]

Keys that are padding (tiles a frame does not use, frames beyond a video's end) are masked out; a group
with no real frame is marked empty. The time embedding is indexed by the frame's position among the
sampled frames, so it tells the latents both the order inside a group and which group they read.

The gain is ours (not Flamingo's): a learned per-channel scale for every (frame, token slot) of the media
keys and values. An attention-weighted sum of additively embedded tokens carries "what", "where" and
"when" only as separate averages, so motion (where *at which* time) must wait for the attention to become
selective, which it did not within a demo's budget. With the multiplicative gain even a uniform average is
a slot- and time-specific linear map of the tokens (the temporal difference a linear probe reads motion
from); see docs/ARCHITECTURE.md, Video.

Visibility (as `<|image|>`, see `adapters.cross_attention.image_spans`): each `<|video|>` is visible from
its own token up to the next `<|video|>`; text before the first one sees no video, and its rows get
nothing from the video cross-attention blocks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cross_attention import image_spans


class PerceiverLayer(nn.Module):
    """Latents `[n, L, dim]` attend to media `[n, M, dim]` and to themselves, then a GELU FFN."""

    def __init__(self, dim: int, heads: int, ffn_mult: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"aggregator heads ({heads}) must divide the width ({dim})")
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ffn_mult * dim, bias=False), nn.GELU(),
                                 nn.Linear(ffn_mult * dim, dim, bias=False))

    def forward(self, latents: torch.Tensor, media: torch.Tensor, media_mask: torch.Tensor,
                gain: torch.Tensor) -> torch.Tensor:
        """media_mask bool `[n, M]` (True = a real key), gain `[n or 1, M, dim]` → latents `[n, L, dim]`."""
        n, length, dim = latents.shape
        q_in = self.norm_latents(latents)
        kv_in = torch.cat([self.norm_media(media) * gain, q_in], dim=1)
        keep = torch.cat([media_mask, media_mask.new_ones(n, length)], dim=1)  # latents always see themselves

        def heads(x):
            return x.view(n, x.shape[1], self.heads, dim // self.heads).transpose(1, 2)

        k, v = self.wkv(kv_in).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(heads(self.wq(q_in)), heads(k), heads(v), attn_mask=keep[:, None, None, :])
        latents = latents + self.wo(out.transpose(1, 2).reshape(n, length, dim))
        return latents + self.ffn(latents)


class TemporalAggregator(nn.Module):
    """Frame tokens `[n, frames, tokens, dim]` → aggregated frames `[n, frames // frames_per_group, n_latents, dim]`.

    `frames` must be a multiple of `frames_per_group` (pad with masked frames) and at most `max_frames`;
    `tokens` = `media_tokens` (max tiles × tokens per tile of the encoder).
    """

    def __init__(self, dim: int, *, frames_per_group: int, max_frames: int, n_latents: int, layers: int, heads: int,
                 ffn_mult: int, media_tokens: int):
        super().__init__()
        self.frames_per_group, self.max_frames, self.media_tokens = frames_per_group, max_frames, media_tokens
        # Unit-scale initialisation as Flamingo's: a time embedding much smaller than the frame features would
        # leave the latents blind to frame order (motion) until it has grown.
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        self.time_embedding = nn.Parameter(torch.randn(max_frames, dim))
        # Temporal-region init: half the channels ramp from muted at the first frame to doubled at the last, the
        # other half the reverse, so even a uniform average holds "early" and "late" content apart; slot gains
        # of ±50 % make that average slot-specific ("where when").
        ramp = torch.linspace(-1.0, 1.0, max_frames)[:, None]
        sign = torch.ones(dim).index_fill_(0, torch.arange(1, dim, 2), -1.0)
        self.time_gain = nn.Parameter(ramp * sign)
        self.slot_gain = nn.Parameter(0.5 * torch.randn(media_tokens, dim))
        self.layers = nn.ModuleList(PerceiverLayer(dim, heads, ffn_mult) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, frames: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames `[n, F, tokens, dim]`, token_mask bool `[n, F, tokens]` (real tokens of real frames) →
        (aggregated `[n, G, n_latents, dim]`, group_mask bool `[n, G]`: the group holds a real frame)."""
        n, f, tokens, dim = frames.shape
        g = self.frames_per_group
        if f % g or f > self.max_frames:
            raise ValueError(f"{f} frames: need a multiple of frames_per_group={g}, at most max_frames={self.max_frames}")
        if tokens != self.media_tokens:
            raise ValueError(f"frames have {tokens} tokens each, the aggregator was built for {self.media_tokens}")
        if token_mask.shape != frames.shape[:3]:
            raise ValueError(f"token_mask must be {list(frames.shape[:3])}, got {list(token_mask.shape)}")
        x = frames + self.time_embedding[:f, None].to(frames.dtype)
        x = x.reshape(n * (f // g), g * tokens, dim)
        mask = token_mask.reshape(n * (f // g), g * tokens)
        gain = (1 + self.time_gain[:f, None]) * (1 + self.slot_gain)  # [F, tokens, dim]
        gain = gain.to(frames.dtype).reshape(1, f // g, g * tokens, dim).expand(n, -1, -1, -1).reshape(x.shape)
        latents = self.latents.to(frames.dtype).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, x, mask, gain)
        out = self.norm(latents).view(n, f // g, -1, dim)
        return out, mask.any(-1).view(n, f // g)


def resize_time_embedding(table: torch.Tensor, frames: int) -> torch.Tensor:
    """`[old_frames, dim]` → `[frames, dim]` by linear interpolation over relative time (first and last rows kept)."""
    if table.shape[0] == frames:
        return table
    out = F.interpolate(table.T[None].float(), size=frames, mode="linear", align_corners=True)[0].T
    return out.to(table.dtype).contiguous()


def frame_token_mask(aspect_ratios: torch.Tensor, frame_mask: torch.Tensor, max_tiles: int, tokens_per_tile: int
                     ) -> torch.Tensor:
    """Real encoder tokens of every frame: aspect_ratios `[..., 2]`, frame_mask bool `[...]` → bool `[..., tiles·tokens]`."""
    n_tiles = aspect_ratios[..., 0] * aspect_ratios[..., 1]
    tile = torch.arange(max_tiles, device=aspect_ratios.device)
    real = (tile < n_tiles[..., None]) & frame_mask[..., None]
    return real.repeat_interleave(tokens_per_tile, dim=-1)


def video_mask(tokens: torch.Tensor, video_token_id: int, group_mask: torch.Tensor) -> torch.Tensor:
    """Which aggregated frames each text position may attend to: bool `[batch, seq, n_videos, groups]`.

    tokens `[batch, seq]` (the whole sequence); group_mask bool `[batch, n_videos, groups]`, one video per
    `<|video|>` in order (an absent video has no real group). Same spans as `<|image|>` (module docstring).
    """
    b, t = tokens.shape
    n_videos = group_mask.shape[1]
    mask = torch.zeros(b, t, *group_mask.shape[1:], dtype=torch.bool, device=tokens.device)
    for i, row in enumerate(tokens.tolist()):
        spans = image_spans(row, video_token_id)
        if len(spans) > n_videos:
            raise ValueError(f"sample {i} has {len(spans)} <|video|> tokens but only {n_videos} video slots")
        for j, (s, e) in enumerate(spans):
            if not group_mask[i, j].any():
                raise ValueError(f"sample {i}: <|video|> number {j + 1} has no frames")
            mask[i, s:e, j] = group_mask[i, j]
    return mask

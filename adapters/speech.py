"""The speech adapter (SPEC §5.4) and how its output enters the LM (SPEC §5.1: no cross-attention).

Conformer frames (40 ms) → Conv1d kernel 3 stride 2 (80 ms) → one rotary Transformer layer → linear to the
LM width. Each adapter frame then *replaces* the embedding of one `<|speech|>` placeholder of the token
sequence `… <|speech_start|> <|speech|>×L <|speech_end|> …`; text positions keep their embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.speech.conformer import FeedForward, RotarySelfAttention, rotary_frequencies, valid_mask
from mm_llama.config.speech import SpeechAdapterArgs, SpeechTokenIds
from mm_llama.model.rope import rotary_tables


class SpeechAdapter(nn.Module):
    """`forward(encoded [batch, frames, encoder_dim], lengths [batch])` → (`[batch, frames', lm_dim]`, lengths').

    frames' = `args.output_length(frames)`; padded output frames are zero.
    """

    def __init__(self, encoder_dim: int, args: SpeechAdapterArgs, lm_dim: int):
        super().__init__()
        self.args = args
        self.conv = nn.Conv1d(encoder_dim, args.dim, args.conv_kernel, stride=args.conv_stride, padding=args.conv_kernel // 2)
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = RotarySelfAttention(args.dim, args.n_heads, args.dropout)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim, args.dropout)
        self.output = nn.Linear(args.dim, lm_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        pad, k, s = self.args.conv_kernel // 2, self.args.conv_kernel, self.args.conv_stride
        return torch.where(lengths > 0, (lengths + 2 * pad - k) // s + 1, 0)

    def forward(self, encoded: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = encoded.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=encoded.device)
        # zeroed padding reads exactly as the conv's own zero padding of a shorter clip
        x = encoded * valid_mask(lengths, t)[..., None]
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # [batch, frames', dim]
        out_lengths = self.output_lengths(lengths)
        valid = valid_mask(out_lengths, x.shape[1])
        n = x.shape[1]
        positions = torch.arange(n, device=x.device).expand(b, n)
        cos, sin = rotary_tables(positions, rotary_frequencies(self.attention.head_dim, self.args.rope_theta, x.device))
        x = x + self.attention(self.attention_norm(x), cos, sin, valid)
        x = x + self.feed_forward(self.ffn_norm(x))
        return self.output(x) * valid[..., None], out_lengths


def speech_spans(tokens: torch.Tensor, ids: SpeechTokenIds) -> list[tuple[int, int, int]]:
    """Runs of `<|speech|>` in reading order as `(row, first, end)` (end exclusive), each checked to sit
    directly between `<|speech_start|>` and `<|speech_end|>`; ValueError naming the position otherwise."""
    is_speech = F.pad((tokens == ids.speech).int(), (1, 1))  # [batch, seq + 2]
    edges = is_speech[:, 1:] - is_speech[:, :-1]  # +1 where a run starts, −1 one past its end
    starts, ends = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
    spans = []
    for (row, first), (_, end) in zip(starts, ends):
        before = int(tokens[row, first - 1]) if first > 0 else None
        after = int(tokens[row, end]) if end < tokens.shape[1] else None
        if before != ids.start or after != ids.end:
            raise ValueError(f"<|speech|> placeholders at row {row}, positions {first}..{end - 1} are not enclosed by "
                             f"<|speech_start|> ({ids.start}) and <|speech_end|> ({ids.end}): found {before} and {after}")
        spans.append((row, first, end))
    return spans


def splice_speech(
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    speech: torch.Tensor | None,
    speech_lengths: torch.Tensor | None,
    ids: SpeechTokenIds,
) -> torch.Tensor:
    """Write adapter frames over the `<|speech|>` placeholders' embeddings.

    embeddings `[batch, seq, dim]`, tokens `[batch, seq]`; speech `[n_clips, frames, dim]` (the adapter
    output) with speech_lengths `[n_clips]`, one clip per `<|speech|>` span in reading order (row by row,
    left to right). Clip i's first `speech_lengths[i]` frames land, in order, exactly on span i. Returns a new
    tensor (the input when there is no speech); a ValueError says which span and clip disagree.
    """
    spans = speech_spans(tokens, ids)
    n_clips = 0 if speech is None else speech.shape[0]
    if len(spans) != n_clips:
        raise ValueError(f"the tokens hold {len(spans)} <|speech|> spans but {n_clips} audio clips were given")
    if not spans:
        return embeddings
    if speech.shape[-1] != embeddings.shape[-1]:
        raise ValueError(f"speech frames have width {speech.shape[-1]} but the embeddings {embeddings.shape[-1]}: "
                         f"the adapter's lm_dim must be the LM's dim")
    if speech_lengths is None:
        speech_lengths = torch.full((n_clips,), speech.shape[1], dtype=torch.long)
    lengths = speech_lengths.tolist()
    for i, ((row, first, end), n) in enumerate(zip(spans, lengths)):
        if end - first != n:
            raise ValueError(f"audio clip {i} has {n} adapter frames but its <|speech|> span (row {row}, positions "
                             f"{first}..{end - 1}) has {end - first} placeholders; compute the placeholder count "
                             f"with SpeechConfig.adapter_frames(n_samples)")
    frames = torch.cat([speech[i, :n] for i, n in enumerate(lengths)]).to(embeddings.dtype)  # [sum(lengths), dim]
    # masked_scatter fills the True positions in row-major order: the spans' reading order
    return embeddings.masked_scatter((tokens == ids.speech)[..., None], frames)

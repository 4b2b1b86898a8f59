"""BEST-RQ pre-training of the speech encoder (Chiu et al. 2022; SPEC §5.3).

Targets: `stack` normalised log-mel frames (320 values) → a frozen random projection to 16 dims → the index
of the nearest (cosine) vector of a frozen codebook of 8,192 unit vectors; 16 independent projection /
codebook pairs give 16 labels per encoder frame. Both are drawn once from `seed`, kept as buffers (saved in
checkpoints, never in the optimizer) and never updated. Labels come from the *unmasked* features.

Input masking: every valid log-mel frame starts a span of `mask_span` frames with probability `mask_prob`
(spans may overlap); masked frames are replaced with N(0, noise_std²) noise before the encoder. An encoder
frame is a target only when all `stack` frames under it are masked, so no target is partly visible.

Loss: one linear softmax head per codebook on the encoder output; the mean over codebooks of the
cross-entropy over target frames ("multi-softmax"). Metrics: masked-frame accuracy, the target fraction, and
the perplexity of the assigned codes (near min(frames, codebook_size) when healthy, 1 when collapsed).

Resuming: the quantiser is in the state dict, and masks and noise come from `generator` (or, when None, the
global CPU RNG, whose state the training engine checkpoints), so a resumed run draws the same masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .args import BestRQArgs
from .conformer import ConformerEncoder, encoder_lengths, stack_frames, valid_mask

# Rows of [frames, codebook_size] similarities computed at once, bounding the labelling memory.
_LABEL_CHUNK = 8192


class RandomProjectionQuantizer(nn.Module):
    """Stacked features `[..., in_dim]` → labels `[..., n_codebooks]` (int64 in [0, codebook_size))."""

    def __init__(self, in_dim: int, args: BestRQArgs):
        super().__init__()
        g = torch.Generator().manual_seed(args.seed)
        bound = math.sqrt(6.0 / (in_dim + args.code_dim))  # Xavier-uniform, as the BEST-RQ paper
        projection = torch.empty(args.n_codebooks, in_dim, args.code_dim).uniform_(-bound, bound, generator=g)
        codebooks = torch.randn(args.n_codebooks, args.codebook_size, args.code_dim, generator=g)
        self.register_buffer("projection", projection)  # [n_codebooks, in_dim, code_dim]
        self.register_buffer("codebooks", F.normalize(codebooks, dim=-1))  # [n_codebooks, codebook_size, code_dim]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).float()
        labels = torch.empty(flat.shape[0], self.projection.shape[0], dtype=torch.long, device=x.device)
        for i in range(0, flat.shape[0], _LABEL_CHUNK):
            z = F.normalize(torch.einsum("nd,hde->hne", flat[i:i + _LABEL_CHUNK], self.projection), dim=-1)
            labels[i:i + _LABEL_CHUNK] = torch.einsum("hne,hve->hnv", z, self.codebooks).argmax(-1).T
        return labels.view(*x.shape[:-1], -1)


def span_mask(lengths: torch.Tensor, max_len: int, args: BestRQArgs, stack: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """bool `[batch, max_len]` input-frame mask: spans of `mask_span` frames starting with prob `mask_prob`.

    An utterance whose spans cover no whole stack of frames gets one span placed uniformly where it fits, so
    every utterance has at least one target frame (no empty, NaN loss on short clips).
    """
    device = lengths.device
    valid = valid_mask(lengths, max_len)
    starts = (torch.rand(lengths.shape[0], max_len, generator=generator).to(device) < args.mask_prob) & valid
    # uniform in [0, max(length − span, 0)]: drawn for every row so the generator advances the same way
    fallback = (torch.rand(lengths.shape[0], generator=generator).to(device)
                * ((lengths - args.mask_span).clamp_min(0) + 1)).long()

    def spans(s: torch.Tensor) -> torch.Tensor:  # frame t is masked when a span starts in (t − span, t]
        c = F.pad(s.long().cumsum(1), (args.mask_span, 0))
        return (c[:, args.mask_span:] - c[:, :-args.mask_span] > 0) & valid

    mask = spans(starts)
    empty = ~target_mask(mask, lengths, stack).any(1)
    rows = empty.nonzero().squeeze(1)
    starts[rows, fallback[rows]] = True
    return spans(starts)


def target_mask(mask: torch.Tensor, lengths: torch.Tensor, stack: int) -> torch.Tensor:
    """bool `[batch, frames // stack]`: encoder frames whose `stack` input frames are all masked."""
    full = stack_frames(mask[..., None].float(), stack).amin(-1) > 0
    return full & valid_mask(encoder_lengths(lengths, stack), full.shape[1])


def multi_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over codebooks of the cross-entropy over target frames only.

    logits `[batch, frames, n_codebooks, codebook_size]` (or already gathered `[n, n_codebooks, size]` with
    `targets=None`), labels `[batch, frames, n_codebooks]`, targets bool `[batch, frames]`.
    """
    if targets is not None:
        logits, labels = logits[targets], labels[targets]
    if labels.shape[0] == 0:
        raise ValueError("BEST-RQ: no masked target frames in this batch")
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="mean")


def code_perplexity(labels: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Per-codebook perplexity exp(H) of the assigned codes `[n, n_codebooks]` → `[n_codebooks]`.

    1 when every frame gets the same code (collapse); at most min(n, codebook_size).
    """
    n, books = labels.shape
    offsets = torch.arange(books, device=labels.device) * codebook_size
    counts = torch.bincount((labels + offsets).flatten(), minlength=books * codebook_size).view(books, codebook_size)
    p = counts.float() / max(n, 1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(-1))


@dataclass
class BestRQOutput:
    """loss (scalar); labels `[batch, frames, n_codebooks]`; targets bool `[batch, frames]`; metrics: detached scalars."""

    loss: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    metrics: dict[str, torch.Tensor]


class BestRQ(nn.Module):
    """The encoder plus the frozen quantiser and the softmax heads; `forward(feats, lengths)` → `BestRQOutput`.

    feats `[batch, frames, n_mels]` are normalised log-mels (the front end's `normalize: utterance`),
    lengths `[batch]`. After pre-training only `encoder` is kept.
    """

    def __init__(self, encoder: ConformerEncoder, args: BestRQArgs):
        super().__init__()
        self.args = args
        self.encoder = encoder
        enc = encoder.args
        self.quantizer = RandomProjectionQuantizer(enc.stack * enc.n_mels, args)
        self.heads = nn.Linear(enc.dim, args.n_codebooks * args.codebook_size)

    def logits(self, encoded: torch.Tensor) -> torch.Tensor:
        """`[..., dim]` → `[..., n_codebooks, codebook_size]`."""
        return self.heads(encoded).unflatten(-1, (self.args.n_codebooks, self.args.codebook_size))

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> BestRQOutput:
        stack = self.encoder.args.stack
        b, t, _ = feats.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=feats.device)
        labels = self.quantizer(stack_frames(feats, stack))
        mask = span_mask(lengths, t, self.args, stack, generator)
        noise = torch.randn(feats.shape, generator=generator).to(feats.device, feats.dtype) * self.args.noise_std
        encoded, out_lengths = self.encoder(torch.where(mask[..., None], noise, feats), lengths)
        targets = target_mask(mask, lengths, stack)
        logits = self.logits(encoded[targets])  # [n_targets, n_codebooks, codebook_size]
        loss = multi_softmax_loss(logits, labels[targets], None)
        with torch.no_grad():
            valid = valid_mask(out_lengths, encoded.shape[1])
            metrics = {
                "accuracy": (logits.argmax(-1) == labels[targets]).float().mean(),
                "masked_fraction": targets.sum() / valid.sum(),
                "code_perplexity": code_perplexity(labels[valid], self.args.codebook_size).mean(),
            }
        return BestRQOutput(loss, labels, targets, metrics)

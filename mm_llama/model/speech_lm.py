"""The composed speech–text model (SPEC §5.1): a Llama 3 LM, the Conformer speech encoder, the speech adapter.

The model *holds* its parts and never renames the LM's parameters: `lm` is a plain `Transformer`
(Meta's keys under `lm.`), `speech_encoder` the `ConformerEncoder`, `speech_adapter` the `SpeechAdapter`.
There is no cross-attention: the adapter's frames replace the embeddings of the `<|speech|>`
placeholders (`adapters.speech.splice_speech`), and the LM's blocks run on the result unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.speech import SpeechAdapter, splice_speech
from encoders.speech.conformer import ConformerEncoder

from ..config.speech import SpeechConfig
from .args import LlamaArgs
from .kv_cache import KVCache
from .llama import Transformer


class SpeechLM(nn.Module):
    """`model(tokens, speech_feats=..., speech_lengths=...)` → logits `[batch, seq, vocab]`."""

    def __init__(self, lm: Transformer | LlamaArgs, speech: SpeechConfig):
        super().__init__()
        self.lm = lm if isinstance(lm, Transformer) else Transformer(lm)
        self.config = speech
        self.speech_ids = speech.token_ids_for(self.lm.args.vocab_size)
        self.speech_encoder = ConformerEncoder(speech.encoder)
        self.speech_adapter = SpeechAdapter(speech.encoder.dim, speech.adapter, self.lm.args.dim)

    @property
    def args(self) -> LlamaArgs:
        return self.lm.args

    def encode_speech(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised log-mels `[n_clips, frames, n_mels]` (+ lengths `[n_clips]`) → adapter frames
        `[n_clips, frames', lm_dim]` and their lengths `[n_clips]`."""
        encoded, lengths = self.speech_encoder(feats, lengths)
        return self.speech_adapter(encoded, lengths)

    def embed(self, tokens: torch.Tensor, speech: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """tokens `[batch, seq]` → `[batch, seq, dim]`, with `speech = (frames, lengths)` over the placeholders."""
        h = self.lm.tok_embeddings(tokens)
        frames, lengths = speech if speech is not None else (None, None)
        return splice_speech(h, tokens, frames, lengths, self.speech_ids)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        speech_feats: torch.Tensor | None = None,
        speech_lengths: torch.Tensor | None = None,
        speech: tuple[torch.Tensor, torch.Tensor] | None = None,
        positions: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        start_pos: int = 0,
        doc_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens `[batch, seq]` → logits `[batch, seq, vocab]` (`[n, vocab]` at the positions `logits_at` selects).

        The audio of the `<|speech|>` spans, in reading order (row by row, left to right): `speech_feats`
        `[n_clips, frames, n_mels]` with `speech_lengths` `[n_clips]`, or `speech = encode_speech(...)`
        computed once (reused across decode steps). Tokens without placeholders need neither.
        `doc_ids` `[batch, seq]`: packed documents (block-diagonal attention, positions restart), as the LM's.
        """
        if speech_feats is not None:
            if speech is not None:
                raise ValueError("pass either speech_feats or speech (encoded), not both")
            speech = self.encode_speech(speech_feats, speech_lengths)
        h = self.embed(tokens, speech)
        (cos, sin), mask = self.lm.prepare(tokens, doc_ids, positions, start_pos)
        return self.lm.logits(self.lm.forward_hidden(h, cos, sin, mask, caches, start_pos), logits_at)

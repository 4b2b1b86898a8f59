"""Supervised fine-tuning (SPEC §3.3): cross-entropy on what the assistant says, dialogs packed apart.

Dialogs are packed whole into rows with document ids, so a dialog never attends to another and its
positions start at 0; the loss covers assistant content and its terminator, never prompts or headers.
"""
from __future__ import annotations

import torch

from ...data.dialog import IGNORE, SFTLoader, sft_heldout
from ...model import Transformer, init_weights
from ..losses import lm_loss_sum
from .base import register
from .post_base import PostTask


def lm_from_state(args, state: dict | None, seed: int) -> Transformer:
    """A `Transformer` holding `state` (an LM's Meta keys), or freshly initialised when None."""
    model = Transformer(args)
    if state is None:
        init_weights(model, torch.Generator().manual_seed(seed))
    else:
        model.load_state_dict(state, strict=not args.tie_embeddings)
    return model


@register("sft")
class SFT(PostTask):
    def build_model(self):
        return lm_from_state(self.cfg.model.lm, self.start_state(), self.cfg.run.seed)

    def loader(self, seq_len, batch_size, rank, world_size):
        return SFTLoader(self.cfg.data, self.cfg.run.seed, rank, world_size, chat=self.chat, seq_len=seq_len,
                         batch_size=batch_size)

    def count(self, batch) -> int:
        return int((batch.labels != IGNORE).sum())

    def loss(self, model, batch, device) -> torch.Tensor:
        logits = model(batch.tokens.to(device), doc_ids=batch.doc_ids.to(device))
        return lm_loss_sum(logits, batch.labels.to(device))

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        return sft_heldout(self.cfg.data, self.chat, seq_len, batch_size, self.cfg.train.eval_batches)

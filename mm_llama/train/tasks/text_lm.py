"""Next-token prediction on packed text (the text stages: pre-training, long context, annealing)."""
from __future__ import annotations

import torch
from torch import nn

from ...config import ConfigError
from ...data import TextLoader, heldout_batches
from ...model import Transformer, init_weights
from ..losses import IGNORE, compiled_lm_loss_sum, lm_loss_sum
from .base import Task, register


def load_init(model: nn.Module, source_path: str) -> None:
    """Copy the weights of `init.from` (any layout `from_pretrained` reads) into a same-shape LM."""
    from ...checkpoint import from_pretrained

    source = from_pretrained(source_path)
    # compare what the weights mean, not how the FFN width was spelled (multiple_of vs multiplier)
    keys = ["dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size", "norm_eps", "rope_theta",
            "use_scaled_rope", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
            "rope_original_context", "tie_embeddings"]
    diff = [k for k in keys if getattr(source.args, k) != getattr(model.args, k)]
    if diff:
        raise ConfigError(f"init.from {source_path}: its model differs from model.lm in {diff}")
    model.load_state_dict(source.state_dict())


@register("lm")
class TextLM(Task):
    def check(self) -> None:
        self.check_data()

    def build_model(self) -> nn.Module:
        model = Transformer(self.cfg.model.lm)
        if self.cfg.init.from_ is None:
            init_weights(model, torch.Generator().manual_seed(self.cfg.run.seed))
        else:
            load_init(model, self.cfg.init.from_)
        return model

    def loader(self, seq_len, batch_size, rank, world_size):
        return TextLoader(self.cfg.data, self.tokenizer, seq_len=seq_len, batch_size=batch_size,
                          seed=self.cfg.run.seed, rank=rank, world_size=world_size)

    def count(self, batch) -> int:
        return int((batch.labels != IGNORE).sum())

    def loss(self, model, batch, device) -> torch.Tensor:
        logits = model(batch.tokens.to(device), doc_ids=batch.doc_ids.to(device))
        loss_sum = compiled_lm_loss_sum() if self.cfg.train.compile else lm_loss_sum
        return loss_sum(logits, batch.labels.to(device))

    def batch_tokens(self, batch) -> int:
        return batch.tokens.numel()

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        return heldout_batches(self.cfg.data, self.tokenizer, seq_len, batch_size, self.cfg.train.eval_batches)

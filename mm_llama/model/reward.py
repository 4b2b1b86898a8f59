"""The reward model (SPEC §3.2): the language model with a scalar head on its final hidden states.

Composed, never renamed: `lm` is a plain `Transformer` (Meta's keys, stored as `lm.<key>`; its output
projection is kept, unused, so the weights go back into an LM unchanged), `value_head` maps the final
normed hidden state of a token to one reward logit. A response's reward is the logit at its last token
(its terminator). The head starts at zero, so a fresh model gives every response reward 0.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .args import LlamaArgs
from .llama import Transformer
from .masks import AttentionMask

VALUE_HEAD = "value_head.weight"


class RewardModel(nn.Module):
    """`model(tokens, mask=..., positions=...)` → reward logits per token `[batch, seq]` (fp32)."""

    def __init__(self, lm: Transformer | LlamaArgs):
        super().__init__()
        self.lm = lm if isinstance(lm, Transformer) else Transformer(lm)
        self.value_head = nn.Linear(self.lm.args.dim, 1, bias=False)
        nn.init.zeros_(self.value_head.weight)

    @property
    def args(self) -> LlamaArgs:
        return self.lm.args

    def forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens `[batch, seq]`; `mask` bool `[batch, 1, seq, seq]` (True: may attend) with `positions`
        `[batch, seq]`, or `doc_ids` `[batch, seq]` (block-diagonal causal), or neither (causal)."""
        if mask is not None and doc_ids is not None:
            raise ValueError("pass either an explicit mask or doc_ids, not both")
        (cos, sin), causal = self.lm.prepare(tokens, doc_ids=doc_ids, positions=positions)
        attention = AttentionMask(mask) if mask is not None else causal
        h = self.lm.forward_hidden(self.lm.tok_embeddings(tokens), cos, sin, attention)
        return self.value_head(h).squeeze(-1).float()


def is_reward_state(state: dict) -> bool:
    return VALUE_HEAD in state




def load_reward_model(path: str | Path, device="cpu") -> tuple[RewardModel, "ModelConfig"]:  # noqa: F821
    """A reward model saved natively (a folder or a run directory): `model.yaml` + `lm.*`, `value_head.weight`."""
    from ..checkpoint.native import (
        MODEL_SAFETENSORS,
        MODEL_YAML,
        CheckpointError,
        check_state_dict,
        is_native_checkpoint,
        is_run_dir,
        read_safetensors,
        require_file,
        run_dir_model,
    )
    from ..config import ModelConfig, load_config

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such reward model folder")
    if is_run_dir(folder) and not is_native_checkpoint(folder):
        folder = run_dir_model(folder)
    config = load_config(ModelConfig, require_file(folder / MODEL_YAML, "model config"))
    weights = folder / MODEL_SAFETENSORS
    state = read_safetensors(weights, device)
    if not is_reward_state(state):
        raise CheckpointError(f"{weights}: no '{VALUE_HEAD}', so not a reward model (a language model?)")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in RewardModel(config.lm).state_dict().items()}
    check_state_dict({k: v.shape for k, v in state.items()}, expected, str(weights))
    model = RewardModel(config.lm)
    model.load_state_dict(state)
    return model.to(device), config

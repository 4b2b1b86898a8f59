"""The reward model (SPEC §3.2): the language model with a scalar head on its final hidden states.

Composed, never renamed: `lm` is a plain `Transformer` (Meta's keys, stored as `lm.<key>`; its output
projection is kept, unused, so the weights go back into an LM unchanged), `value_head` maps the final
normed hidden state of a token to one reward logit. A response's reward is the logit at its last token
(its terminator). The head starts small and random (std 1/√(dim+1)), not at zero: with a zero head the LM
gets no gradient until the head has grown along the tiny difference between two responses' final states,
and the demo RM sat at loss ln 2 for 150–200 of its 400 steps.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adapters.cross_attention import cross_attention_bias

from .args import LlamaArgs
from .llama import Transformer
from .masks import AttentionMask
from .multimodal import MultimodalModel

VALUE_HEAD = "value_head.weight"


def value_head(dim: int) -> nn.Linear:
    """dim → 1 reward logit, weights ~ N(0, 1/(dim+1)) from the global generator (the stage seeds it)."""
    head = nn.Linear(dim, 1, bias=False)
    nn.init.normal_(head.weight, std=(dim + 1) ** -0.5)
    return head


class RewardModel(nn.Module):
    """`model(tokens, mask=..., positions=...)` → reward logits per token `[batch, seq]` (fp32)."""

    def __init__(self, lm: Transformer | LlamaArgs):
        super().__init__()
        self.lm = lm if isinstance(lm, Transformer) else Transformer(lm)
        self.value_head = value_head(self.lm.args.dim)

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


class VisionRewardModel(MultimodalModel):
    """The vision reward model (paper §7.5.3): the composed image–text model with the language RM's value head.

    Keys are the composed model's (`lm.*`, `vision.*`, `cross_attention.*`, `image_embedding.weight`) plus
    `value_head.weight`; the paper initialises the self-attention layers (`lm.*`, and here the head) from
    the language RM and trains the vision encoder and cross-attention only (the stage's `train.trainable`).
    `model(tokens, images=..., aspect_ratios=..., mask=..., positions=...)` → reward logits `[batch, seq]`.
    """

    def __init__(self, lm: Transformer | LlamaArgs, vision: "VisionConfig"):  # noqa: F821
        super().__init__(lm, vision)
        self.value_head = value_head(self.lm.args.dim)

    def forward(self, tokens: torch.Tensor, *, images: torch.Tensor | None = None,
                aspect_ratios: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens `[batch, seq]`; images `[batch, n_images, tiles, 3, S, S]` with aspect_ratios `[batch, n_images, 2]`
        (or None: text only); `mask` bool `[batch, 1, seq, seq]` (True: may attend) with `positions`, or causal.
        Each text token sees the images whose `<|image|>` precedes it, as in `MultimodalModel`."""
        # MultimodalModel.forward ends in the vocabulary projection; the value head reads the normed
        # hidden state instead, so the layer loop is repeated here (same blocks, same order).
        (cos, sin), causal = self.lm.prepare(tokens, positions=positions)
        attention = AttentionMask(mask) if mask is not None else causal
        h = self.embed(tokens)
        context = bias = rows = None
        if images is not None:
            if aspect_ratios is None:
                raise ValueError("images need aspect_ratios [batch, n_images, 2] (rows, cols)")
            context = self.encode_images(images, aspect_ratios)
            bias, rows = cross_attention_bias(self.vision_mask(tokens, aspect_ratios), context.tokens.shape[3], h.dtype)
        elif (tokens == self.image_token_id).any():
            raise ValueError("tokens contain <|image|> but no images were passed")
        for i, layer in enumerate(self.lm.layers):
            if context is not None and str(i) in self.cross_attention:
                h = self.cross_attention[str(i)](h, context.kv[str(i)], bias, rows)
            h = layer(h, cos, sin, attention)
        return self.value_head(self.lm.norm(h)).squeeze(-1).float()


def is_reward_state(state: dict) -> bool:
    return VALUE_HEAD in state



def load_reward_model(path: str | Path, device="cpu"
                      ) -> tuple[RewardModel | VisionRewardModel, "ModelConfig"]:  # noqa: F821
    """A reward model saved natively (a folder or a run directory): `model.yaml` + `lm.*`, `value_head.weight`
    (+ the vision parts for a vision RM, whose `model.yaml` has a `vision:` section)."""
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
    build = (lambda: VisionRewardModel(config.lm, config.vision)) if config.vision is not None else \
        (lambda: RewardModel(config.lm))
    with torch.device("meta"):
        expected = {k: v.shape for k, v in build().state_dict().items()}
    check_state_dict({k: v.shape for k, v in state.items()}, expected, str(weights))
    model = build()
    model.load_state_dict(state)
    return model.to(device), config

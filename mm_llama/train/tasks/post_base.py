"""What the post-training tasks (SFT, reward model, DPO) share: the chat format, starting weights, options.

A stage whose model config has a `vision:` section trains the composed image–text model
(`MultimodalModel`): its dialogs keep their images (`ImageParts` tiles them for the encoder) and
`init.from` is a composed model (e.g. the vision annealing stage) or, for fresh vision parts, an LM.
"""
from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ...config import ConfigError
from ...data.dialog import STRENGTHS, ImageParts
from ...model import Transformer, init_weights
from ...model.multimodal import MultimodalModel
from ...text import ChatFormat
from .base import Task


def lm_from_state(args, state: dict | None, seed: int) -> Transformer:
    """A `Transformer` holding `state` (an LM's Meta keys), or freshly initialised when None."""
    model = Transformer(args)
    if state is None:
        init_weights(model, torch.Generator().manual_seed(seed))
    else:
        model.load_state_dict(state, strict=not args.tie_embeddings)
    return model


def composed_from_state(model_cfg, state: dict | None, seed: int, source: str | None) -> MultimodalModel:
    """A `MultimodalModel` holding `state`: a composed model's keys (every weight; the encoder's positional
    tables resized to this tile size), or an LM's (the vision parts new, the `<|image|>` row from the LM's);
    None: fresh (the LM as `init_weights` draws it, seeded). `source` names where `state` came from, in errors."""
    from .vision_lm import load_composed

    torch.manual_seed(seed)
    model = MultimodalModel(model_cfg.lm, model_cfg.vision)
    if state is not None and any(k.startswith("vision.") for k in state):
        load_composed(model, Path(str(source)), state=state)
    else:
        model.lm.load_state_dict(lm_from_state(model_cfg.lm, state, seed).state_dict())
        with torch.no_grad():
            model.image_embedding.weight[0].copy_(model.lm.tok_embeddings.weight[model.image_token_id])
    return model


def lm_blocks(model: nn.Module) -> list[nn.Module]:
    """The LM's layers: what activation checkpointing and compilation wrap, text or composed model."""
    return list(model.lm.layers) if isinstance(model, MultimodalModel) else list(getattr(model, "layers", []))


class PostOptions(BaseModel):
    """`train.options` every post-training stage accepts.

    `average_with`: more models of the architecture of `init.from`; the stage starts from the average of
    all of them (SPEC §3.5), weighted by `average_weights` (one per model, `init.from` first; default uniform).
    """

    model_config = ConfigDict(extra="forbid")

    average_with: list[str] = Field(default_factory=list)
    average_weights: list[float] | None = None

    @model_validator(mode="after")
    def _weights(self):
        if self.average_weights is not None and len(self.average_weights) != 1 + len(self.average_with):
            raise ValueError(f"average_weights needs {1 + len(self.average_with)} weights (init.from first, then "
                             f"average_with), got {len(self.average_weights)}")
        return self


class PreferenceOptions(PostOptions):
    """`strengths`: the preference ratings kept (paper: only "significantly better" and "better")."""

    strengths: list[str] = Field(default_factory=lambda: list(STRENGTHS[:2]))

    @model_validator(mode="after")
    def _strengths(self):
        bad = [s for s in self.strengths if s not in STRENGTHS]
        if bad or not self.strengths:
            raise ValueError(f"strengths must list some of {', '.join(STRENGTHS)}, got {self.strengths}")
        return self


class PostTask(Task):
    """A task on dialogs: tokenizer + chat format from `data.tokenizer`, start weights from `init.from`."""

    option_schema = PostOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts = self.options(self.option_schema)
        self._chat = None
        if self.opts.average_with and cfg.init.from_ is None:
            raise ConfigError(f"stage '{cfg.name}': train.options.average_with needs init.from (the first model)")

    @property
    def chat(self) -> ChatFormat:
        if self._chat is None:
            self._chat = ChatFormat(self.tokenizer)
        return self._chat

    @property
    def max_tiles(self) -> int:
        """Tile slots of the vision encoder (0: a text model)."""
        return self.cfg.model.vision.encoder.max_num_tiles if self.cfg.model.vision is not None else 0

    def image_parts(self) -> ImageParts | None:
        """The loaders' `decode_media`: tiles for the vision encoder, or None (a text model skips media)."""
        vision = self.cfg.model.vision
        return ImageParts(vision.encoder.tile_size, vision.encoder.max_num_tiles) if vision is not None else None

    def model_from_state(self, state: dict | None, source: str | None = None) -> nn.Module:
        """The stage's model holding `state`: an LM, or the composed image–text model (`vision:` section)."""
        if self.cfg.model.vision is None:
            return lm_from_state(self.cfg.model.lm, state, self.cfg.run.seed)
        return composed_from_state(self.cfg.model, state, self.cfg.run.seed, source or self.cfg.init.from_)

    def check(self) -> None:
        self.check_data()
        vision = self.cfg.model.vision
        if vision is not None and vision.image_token_for(self.cfg.model.lm.vocab_size) != self.tokenizer.image_id:
            raise ConfigError(f"model.vision.image_token_id is {vision.image_token_for(self.cfg.model.lm.vocab_size)} "
                              f"but the tokenizer's <|image|> is {self.tokenizer.image_id} "
                              f"({self.cfg.data.tokenizer_path})")

    def start_state(self) -> dict | None:
        """The starting weights: `init.from`, or its average with `average_with`; None: random init."""
        if self.cfg.init.from_ is None:
            return None
        from ...post.average import average_models

        paths = [self.cfg.init.from_, *self.opts.average_with]
        state, config = average_models(paths, self.opts.average_weights)
        keys = ["dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size"]
        diff = [k for k in keys if getattr(config.lm, k) != getattr(self.cfg.model.lm, k)]
        if diff:
            raise ConfigError(f"init.from {self.cfg.init.from_}: its model differs from model.lm in {diff}")
        return state

    def batch_tokens(self, batch) -> int:
        return batch.tokens.numel()

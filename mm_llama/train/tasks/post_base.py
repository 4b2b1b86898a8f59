"""What the post-training tasks (SFT, reward model, DPO) share: the chat format, starting weights, options."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...config import ConfigError
from ...data.dialog import STRENGTHS
from ...text import ChatFormat
from .base import Task


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

    def check(self) -> None:
        self.check_data()

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

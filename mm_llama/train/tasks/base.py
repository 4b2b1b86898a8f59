"""What a stage trains. The engine owns the loop, optimizer, schedule, checkpoints and resume; a task owns
the model it builds, the batches it streams, and the loss it computes (`train.objective` picks the task).

Contract, so that gradient accumulation equals one large batch and resume is exact:
- `loader(...)` returns an endless iterator factory with `state_dict()`, `load_state_dict()`, `stats()`
  (at least `skipped_samples`), deterministic for a seed, like `mm_llama.data.TextLoader`;
- `count(batch)` is the number of loss units in a batch (labelled tokens, samples, masked frames), known
  before the forward pass; `loss(model, batch)` returns the loss *summed* over those units;
- the model's `state_dict()` keys are what `model.safetensors` stores; `model_config()` is `model.yaml`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ...config import ModelConfig
from ...config.stage import StageConfig

TASKS: dict[str, type["Task"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        TASKS[name] = cls
        return cls

    return deco


def task_for(cfg: StageConfig) -> "Task":
    """The task that `train.objective` names."""
    import importlib

    from .registry import TASK_MODULES

    for module in TASK_MODULES:  # importing a task module registers its tasks
        importlib.import_module(f"{__package__}.{module}")

    try:
        cls = TASKS[cfg.train.objective]
    except KeyError:
        raise ValueError(f"train.objective '{cfg.train.objective}' has no task; known: {sorted(TASKS)}") from None
    return cls(cfg)


class Task(ABC):
    name = ""

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg

    def options(self, schema):
        """`train.options` validated against the task's own pydantic schema (errors name `train.options.<key>`)."""
        from ...config import validate

        return validate(schema, self.cfg.train.options, f"stage '{self.cfg.name}': train.options")

    @cached_property
    def tokenizer(self):
        """The stage's tokenizer (`data.root/data.tokenizer`), read once."""
        from ...text import load_tokenizer

        return load_tokenizer(self.cfg.data.tokenizer_path)

    def check_data(self) -> None:
        """Every data path exists and the model's vocabulary holds every token the tokenizer can produce."""
        from ...config import ConfigError
        from ...data import check_sources

        check_sources(self.cfg.data)
        if self.tokenizer.n_words > self.cfg.model.lm.vocab_size:
            raise ConfigError(f"model.lm.vocab_size ({self.cfg.model.lm.vocab_size}) is smaller than the tokenizer's "
                              f"{self.tokenizer.n_words} tokens ({self.cfg.data.tokenizer_path})")

    def check(self) -> None:
        """Fail before any work on inputs that cannot be used (missing data, mismatched vocabularies)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (seeded by `run.seed`), or the one `init.from` names."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks that activation checkpointing and `torch.compile` wrap one by one."""
        return list(getattr(model, "layers", []))

    def model_config(self) -> ModelConfig:
        return self.cfg.model

    @abstractmethod
    def loader(self, seq_len: int, batch_size: int, rank: int, world_size: int) -> Any:
        """Endless, resumable batches for one rank."""

    @abstractmethod
    def count(self, batch) -> int:
        """Loss units in `batch`, known before the forward pass."""

    @abstractmethod
    def loss(self, model: nn.Module, batch, device: torch.device) -> torch.Tensor:
        """The loss summed over the batch's units."""

    @abstractmethod
    def batch_tokens(self, batch) -> int:
        """Tokens (or frames, or samples) the batch feeds the model, for throughput figures."""

    def heldout(self, seq_len: int, batch_size: int) -> list:
        """Fixed held-out batches (empty: no evaluation)."""
        return []

    def evaluate(self, model: nn.Module, batches: list, device: torch.device, autocast) -> dict[str, float]:
        """Held-out metrics; by default the mean loss per unit as `val_loss`."""
        was_training = model.training
        model.eval()
        total, units = 0.0, 0
        with torch.no_grad():
            for b in batches:
                with autocast():
                    total += float(self.loss(model, b, device))
                units += self.count(b)
        model.train(was_training)
        return {"val_loss": total / max(units, 1)}

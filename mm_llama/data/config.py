"""The `data:` section of a stage config: which shards, in what mix, read how."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator


class SourceConfig(BaseModel):
    """One named stream of shards and its share of the training mix."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shards: str | list[str]  # paths, globs, brace patterns, `pipe:` commands; "::" joins several in one string
    weight: float = 1.0
    text_key: str = "txt"  # sample field holding the text; "json.text" reads field `text` of the `json` member
    # "chat": each sample is a dialog, the `messages` list of its `json` member, encoded in the Llama 3 chat
    # format (header and end-of-turn tokens included, every token a target); text_key is then not used
    format: Literal["text", "chat"] = "text"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("a source needs a non-empty name")
        return v

    @field_validator("shards")
    @classmethod
    def _shards(cls, v: str | list[str]) -> str | list[str]:
        if not v or (isinstance(v, list) and not all(isinstance(s, str) and s for s in v)):
            raise ValueError("give at least one shard path, glob, brace pattern or pipe: command")
        return v

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"weight must be > 0, got {v}")
        return v

    @field_validator("text_key")
    @classmethod
    def _text_key(cls, v: str) -> str:
        if not v or any(not part for part in v.split(".")):
            raise ValueError(f"text_key must be a field name such as 'txt' or 'json.text', got {v!r}")
        return v


class DataConfig(BaseModel):
    """Shard sources for training and evaluation; shard paths are relative to `root`."""

    model_config = ConfigDict(extra="forbid")

    root: str = "data/demo"  # absolute shard paths and pipe: commands are left alone
    tokenizer: str = "tokenizer.model"  # relative to root
    sources: list[SourceConfig]  # training mix; weights are normalised
    heldout: list[SourceConfig] = []  # evaluation sources, read in order, once
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle: bool = True  # seeded shard order per epoch and sample order within a shard buffer
    shuffle_buffer: int = 1000  # samples held for within-shard shuffling

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[SourceConfig]) -> list[SourceConfig]:
        if not v:
            raise ValueError("give at least one training source")
        return v

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"num_workers must be >= 0, got {v}")
        return v

    @field_validator("shuffle_buffer")
    @classmethod
    def _buffer(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        for section in ("sources", "heldout"):
            names = [s.name for s in getattr(self, section)]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{section}: source names must be unique, repeated: {', '.join(dup)}")
        return self

    def path(self, relative: str) -> Path:
        """A path given relative to `root` (absolute paths stay as they are)."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else Path(self.root).expanduser() / p

    @property
    def tokenizer_path(self) -> Path:
        return self.path(self.tokenizer)

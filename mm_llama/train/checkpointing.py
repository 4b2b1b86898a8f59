"""Training checkpoints: written atomically, kept last-N, found again on resume.

A checkpoint is a folder `checkpoints/step_00000123/` holding the native model (`model.safetensors`,
`model.yaml`), `optimizer.pt` and `trainer.pt` (step, tokens, data position, RNG). It is written under a
temporary name and renamed into place (`atomic_folder`), so a folder with the final name is always complete.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.native import (
    MODEL_SAFETENSORS,
    MODEL_YAML,
    atomic_folder,
    check_state_dict,
    expected_shapes,
    export_state_dict,
    read_safetensors,
    write_safetensors,
)
from ..config import ModelConfig, dump_config
from ..model import Transformer

STEP_DIR = re.compile(r"^step_(\d{8})$")


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `model.safetensors` stores: Meta's keys for an LM, the composed model's own keys otherwise;
    a tensor shared under two names (tied embeddings) is stored once, under its first name."""
    if isinstance(model, Transformer):
        return export_state_dict(model)
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t.detach()
    return out


def write_model(model: nn.Module, config: ModelConfig, folder: Path) -> None:
    """The native model files into `folder` (callers make it atomic)."""
    write_safetensors(model_tensors(model), folder / MODEL_SAFETENSORS)
    (folder / MODEL_YAML).write_text(dump_config(config))


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, config: ModelConfig,
                    optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
    final = ckpt_dir / f"step_{step:08d}"
    with atomic_folder(final) as tmp:
        write_model(model, config, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)), key=lambda p: p.name)


def remove_partial(ckpt_dir: Path) -> None:
    """Hidden temporary folders left by a run killed while writing."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".step_*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load tensors saved by `model_tensors` into `model`, naming missing, unexpected and mis-shaped keys."""
    expected = {k: v.shape for k, v in model_tensors(model).items()}
    if isinstance(model, Transformer):
        expected = expected_shapes(model.args)
    check_state_dict({k: v.shape for k, v in state.items()}, expected, source)
    model.load_state_dict(state, strict=False)  # only the second name of a shared tensor is absent


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load `folder/model.safetensors` into `model`."""
    path = folder / MODEL_SAFETENSORS
    load_weights(model, read_safetensors(path), str(path))


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer in place; return the trainer state."""
    load_model_weights(model, folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    return torch.load(folder / "trainer.pt", weights_only=True)


def polyak_average(folders: list[Path]) -> dict[str, torch.Tensor]:
    """Uniform average of the model weights of several checkpoints (SPEC §2.3: annealing's final model)."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for f in folders:
        for k, v in read_safetensors(f / MODEL_SAFETENSORS).items():
            dtypes[k] = v.dtype
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(folders)).to(dtypes[k]) for k, v in total.items()}

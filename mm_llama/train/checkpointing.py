"""Training checkpoints: written atomically, kept last-N, found again on resume.

A checkpoint is a folder `checkpoints/step_00000123/` holding the native model (`model.safetensors`,
`model.yaml`), `optimizer.pt` and `trainer.pt` (step, tokens, data position, RNG). It is written under a
temporary name and renamed into place, so a folder with the final name is always complete.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig, dump_config

STEP_DIR = re.compile(r"^step_(\d{8})$")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (tied output weight stored as `tok_embeddings.weight`)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if id(t) in seen or t.data_ptr() in seen:
            continue
        seen.update((id(t), t.data_ptr()))
        out[name] = t.detach().contiguous()
    return out


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model(model: nn.Module, config: ModelConfig, folder: Path) -> None:
    """The native model files (not atomic by themselves; callers write into a temporary folder)."""
    save_file(model_state(model), str(folder / "model.safetensors"))
    (folder / "model.yaml").write_text(dump_config(config))


def save_checkpoint(ckpt_dir: Path, step: int, model: nn.Module, config: ModelConfig,
                    optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f".tmp-step_{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(model, config, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer.pt")
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def remove_partial(ckpt_dir: Path) -> None:
    """Temporary folders left by a run killed while writing."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".tmp-step_*"):
            shutil.rmtree(p, ignore_errors=True)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    for old in list_checkpoints(ckpt_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load `folder/model.safetensors` into `model`, naming missing, unexpected and mis-shaped keys."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint has no model.safetensors")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: cannot read safetensors file ({e})") from e
    own = model.state_dict()
    tied = {n for n in own if n == "output.weight" and getattr(getattr(model, "args", None), "tie_embeddings", False)}
    missing = sorted(set(own) - set(state) - tied)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                         f"shape mismatch {shapes[:8]}")
    model.load_state_dict(state, strict=False)


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
        for k, v in load_file(str(f / "model.safetensors")).items():
            dtypes[k] = v.dtype
            total[k] = total[k] + v.double() if k in total else v.double()
    return {k: (v / len(folders)).to(dtypes[k]) for k, v in total.items()}

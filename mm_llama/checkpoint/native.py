"""The native checkpoint layout, and the pieces every layout shares.

A native checkpoint is a folder holding `model.yaml` (the `ModelConfig`) and `model.safetensors`
(the state dict under Meta's key names; with tied embeddings the shared matrix is stored once,
as `tok_embeddings.weight`). The training engine writes one per save as
`RUN_DIR/checkpoints/step_00000123/` (beside optimizer and data state, ignored here) and the stage's
output model as `RUN_DIR/final/`; a run directory loads `final/` once it exists, else its highest
complete `step_*` checkpoint.

Folders are written atomically: everything goes into a temporary sibling folder, is fsynced, and
is renamed into place, so a reader never sees a half-written folder under the final name.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig, dump_config, load_config
from ..model.args import LlamaArgs
from ..model.llama import Transformer

MODEL_YAML = "model.yaml"
MODEL_SAFETENSORS = "model.safetensors"
CHECKPOINTS = "checkpoints"
FINAL = "final"
STEP_FOLDER = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and the key."""


# ---------------------------------------------------------------- shared by every layout


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to write into; on success it becomes `final`.

    On error the temporary folder is removed and `final` is left as it was. A process killed
    mid-write leaves only a hidden `.NAME.tmp-*` sibling, which no loader looks at.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would survive the rename and hide the checkpoint from others.
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if final.exists():
            # rename(2) cannot replace a non-empty folder: move the old one aside first, so the
            # final name only ever holds a complete folder (briefly, none).
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing {what}")
    return path


def read_safetensors(path: Path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file; a truncated or corrupt file is an error naming it."""
    require_file(path, "safetensors weights file")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Save contiguous, unshared copies (safetensors refuses views and shared storage)."""
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def check_state_dict(found: Mapping[str, torch.Size], expected: Mapping[str, torch.Size], source: str) -> None:
    """Raise naming every missing and unexpected key, or the first key whose shape is wrong."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else ""]
        raise CheckpointError(f"{source}: state dict does not match the config: " + "; ".join(p for p in parts if p))
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise CheckpointError(
                f"{source}: '{key}' has shape {tuple(found[key])} but the config expects {tuple(shape)}"
            )


def expected_shapes(args: LlamaArgs) -> dict[str, torch.Size]:
    """Meta key → shape for `args`, with `output.weight` absent when embeddings are tied."""
    with torch.device("meta"):
        model = Transformer(args)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def export_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under Meta's names; a tied output matrix appears once, as the embedding."""
    state = dict(model.state_dict())
    if model.args.tie_embeddings:
        del state["output.weight"]
    return state


def build_model(
    args: LlamaArgs, state_dict: Mapping[str, torch.Tensor], source: str, device="cpu", dtype=None
) -> Transformer:
    """A `Transformer` holding `state_dict` (Meta names), after checking keys and shapes."""
    check_state_dict({k: v.shape for k, v in state_dict.items()}, expected_shapes(args), source)
    with torch.device("meta"):
        model = Transformer(args)
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=not args.tie_embeddings, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


# ---------------------------------------------------------------- the native layout


def is_native_checkpoint(folder: Path) -> bool:
    return (folder / MODEL_YAML).is_file() or (folder / MODEL_SAFETENSORS).is_file()


def is_run_dir(folder: Path) -> bool:
    return (folder / CHECKPOINTS).is_dir()


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The highest-numbered complete `checkpoints/step_N` folder of a run directory."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run directory (no '{CHECKPOINTS}/' folder)")
    steps = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_FOLDER.fullmatch(p.name)) and (p / MODEL_SAFETENSORS).is_file() and (p / MODEL_YAML).is_file()
    ]
    if not steps:
        raise FileNotFoundError(f"{root}: no complete step_* checkpoint (with {MODEL_YAML} and {MODEL_SAFETENSORS})")
    return max(steps)[1]


def run_dir_model(run_dir: str | Path) -> Path:
    """The folder a run directory's model loads from: its `final/` output, else the latest checkpoint."""
    final = Path(run_dir) / FINAL
    if (final / MODEL_SAFETENSORS).is_file() and (final / MODEL_YAML).is_file():
        return final
    return latest_checkpoint(run_dir)


def save_native(model: Transformer, config: ModelConfig, folder: str | Path) -> Path:
    """Write `folder/model.yaml` and `folder/model.safetensors` atomically; returns the folder."""
    if config.lm != model.args:
        raise CheckpointError(f"{folder}: config.lm {config.lm} does not describe the model ({model.args})")
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / MODEL_YAML).write_text(dump_config(config))
        write_safetensors(export_state_dict(model), tmp / MODEL_SAFETENSORS)
    return folder


def load_native(folder: str | Path, device="cpu", dtype=None) -> tuple[Transformer, ModelConfig]:
    """Load a native checkpoint folder, or the latest checkpoint of a run directory."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if is_run_dir(folder) and not is_native_checkpoint(folder):
        folder = run_dir_model(folder)
    config = load_config(ModelConfig, require_file(folder / MODEL_YAML, "model config"))
    weights = folder / MODEL_SAFETENSORS
    state = read_safetensors(weights)
    return build_model(config.lm, state, str(weights), device, dtype), config

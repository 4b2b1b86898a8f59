"""Distributed checkpoints in torch.distributed.checkpoint (DCP) format, loadable at any parallel layout.

A distributed checkpoint is a folder `checkpoints/step_00000123/` holding DCP's `.metadata` and one
`__{rank}_0.distcp` file per rank with the model under its own key names (the Transformer's
`model.layers.3.attention.wq.weight`, a composed model's `model.cross_attention.3.attention.wq.weight`, ...) and the optimizer keyed by the same names
(`optim.state.layers.3.attention.wq.weight.exp_avg`, ...), plus `model.yaml` and `trainer.pt` (step,
tokens, RNG, and the data position of every data-parallel rank). Because keys are names and DCP
re-shards on load, a checkpoint written with one layout loads at another (FSDP, TP and PP degrees
may all change; a single process loads it too). `to_safetensors` / `from_safetensors` convert the
model part to and from one native `model.safetensors`.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint.native import MODEL_YAML, CheckpointError, expected_shapes, read_safetensors, write_safetensors
from ..config import ModelConfig, dump_config

METADATA = ".metadata"
TRAINER = "trainer.pt"


def is_distributed(folder: Path) -> bool:
    return (Path(folder) / METADATA).is_file()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(final: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: ModelConfig, trainer_state: dict) -> Path:
    """Every rank writes its shards into a hidden sibling folder; rank 0 adds the rest and renames it into place."""
    tmp = final.parent / f".{final.name}.tmp-dcp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if _rank() == 0:
        torch.save(trainer_state, tmp / TRAINER)
        (tmp / MODEL_YAML).write_text(dump_config(config))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model and optimizer in place at the current layout; return the trainer state."""
    if not is_distributed(folder):
        raise CheckpointError(f"{folder}: not a distributed checkpoint (no {METADATA}); a torchrun run resumes "
                              "only from checkpoints written by torchrun runs")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # get_state_dict gives a fresh optimizer a state for every parameter, but a saved run has none for those that
    # never had a gradient (e.g. an output layer the reward model does not use): they start without one, as there.
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    stepped = {key.removeprefix("optim.state.").rsplit(".", 1)[0] for key in saved if key.startswith("optim.state.")}
    optim_sd["state"] = {name: value for name, value in optim_sd["state"].items() if name in stepped}
    names = [list(group["params"]) for group in optim_sd["param_groups"]]
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=folder)
    # The saved names of each group's parameters are one rank's (a non-tensor value is written once), and a
    # pipeline's ranks hold different parameters: keep this layout's names, with the saved hyperparameters.
    for group, own in zip(state["optim"]["param_groups"], names):
        group["params"] = own
    # Not strict for those parameters only: dcp.load above has already required every model tensor.
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    return torch.load(folder / TRAINER, weights_only=True)


def read_model(folder: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The full model state dict (Meta key names, on CPU) from a distributed checkpoint, read by this process alone."""
    return read_tensors(folder, {k: (shape, torch.float32) for k, shape in expected_shapes(config.lm).items()})


def read_tensors(folder: Path, specs: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """The full tensors `specs` names (key → shape, dtype; e.g. a composed model's), on CPU, read by this process alone."""
    if not is_distributed(folder):
        raise CheckpointError(f"{folder}: not a distributed checkpoint (no {METADATA})")
    state = {"model": {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in specs.items()}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=folder, no_dist=True)
    return state["model"]


def to_safetensors(folder: Path, config: ModelConfig, out: Path) -> Path:
    """Write a distributed checkpoint's model as one native `model.safetensors` (with `model.yaml` beside it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(read_model(folder, config), out)
    (out.parent / MODEL_YAML).write_text(dump_config(config))
    return out


def from_safetensors(path: Path, folder: Path) -> Path:
    """A model-only distributed checkpoint from one `model.safetensors` (any layout can then load it)."""
    dcp.save({"model": read_safetensors(Path(path))}, checkpoint_id=folder, no_dist=True)
    return Path(folder)


def load_model_only(folder: Path, model: nn.Module) -> None:
    """Load just the weights of a distributed checkpoint (e.g. one made by `from_safetensors`) at this layout."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_sd = get_model_state_dict(model)
    state = {"model": model_sd}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])

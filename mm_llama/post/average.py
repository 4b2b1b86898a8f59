"""Model averaging (SPEC §3.5): the weights of models of one architecture, averaged uniformly or weighted.

The paper averages models from runs with different data or hyperparameters at each of the RM, SFT
and DPO stages. Here a stage averages the models it starts from (`train.options.average_with`, beside
`init.from`), and rejection sampling averages the policies it samples from. Any key set works: a
language model, a reward model (`lm.*` + `value_head.weight`), a composed model. The sum runs in fp64
and is cast back to each tensor's stored dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..checkpoint.native import (
    MODEL_SAFETENSORS,
    MODEL_YAML,
    CheckpointError,
    atomic_folder,
    is_native_checkpoint,
    is_run_dir,
    read_safetensors,
    run_dir_model,
    write_safetensors,
)
from ..config import ModelConfig, dump_config, load_config


def read_model(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The state dict and config of a native folder or run directory; Meta and HF folders load as an LM."""
    folder = Path(path)
    if folder.is_dir() and (is_native_checkpoint(folder) or is_run_dir(folder)):
        if not is_native_checkpoint(folder):
            folder = run_dir_model(folder)
        config = load_config(ModelConfig, folder / MODEL_YAML)
        return read_safetensors(folder / MODEL_SAFETENSORS), config
    from ..checkpoint import load_checkpoint

    model, config = load_checkpoint(folder)
    return dict(model.state_dict()), config


def average_states(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float] | None = None,
                   names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Σ wᵢ·stateᵢ / Σ wᵢ over models with identical keys and shapes (`names` label them in errors)."""
    if not states:
        raise ValueError("averaging needs at least one model")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(states))]
    weights = [1.0] * len(states) if weights is None else [float(w) for w in weights]
    if len(weights) != len(states):
        raise ValueError(f"{len(weights)} averaging weights for {len(states)} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"averaging weights must be >= 0 with a positive sum, got {weights}")
    first = states[0]
    for name, state in zip(names[1:], states[1:]):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            raise CheckpointError(f"{name}: not the architecture of {names[0]} (missing keys {missing}, "
                                  f"extra keys {extra})")
        bad = [k for k in first if state[k].shape != first[k].shape]
        if bad:
            raise CheckpointError(f"{name}: '{bad[0]}' has shape {tuple(state[bad[0]].shape)}, {names[0]} has "
                                  f"{tuple(first[bad[0]].shape)}")
    total = sum(weights)
    out = {}
    for key, ref in first.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for w, state in zip(weights, states):
            acc += state[key].double() * (w / total)
        out[key] = acc.to(ref.dtype)
    return out


def average_models(paths: Sequence[str | Path], weights: Sequence[float] | None = None,
                   out: str | Path | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Average the models at `paths` (same `model.yaml` shape); written natively to `out` when given."""
    loaded = [read_model(p) for p in paths]
    configs = [c for _, c in loaded]
    for p, c in zip(paths[1:], configs[1:]):
        if c.model_dump(exclude={"name"}) != configs[0].model_dump(exclude={"name"}):
            raise CheckpointError(f"{p}: its model.yaml describes another architecture than {paths[0]}'s")
    state = average_states([s for s, _ in loaded], weights, [str(p) for p in paths])
    if out is not None:
        with atomic_folder(out) as tmp:
            write_safetensors(state, tmp / MODEL_SAFETENSORS)
            (tmp / MODEL_YAML).write_text(dump_config(configs[0]))
    return state, configs[0]

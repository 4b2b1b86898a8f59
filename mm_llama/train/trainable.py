"""Which parameters train in a stage: fnmatch patterns over parameter names."""
from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def select_trainable(model: nn.Module, trainable: list[str], frozen: list[str]) -> list[str]:
    """Set `requires_grad` from the patterns; return the names that train. Patterns matching nothing are errors."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in [*trainable, *frozen]:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"train pattern '{pattern}' matches no parameter (examples: {', '.join(names[:4])}, ...)")
    chosen = []
    for name, p in model.named_parameters():
        on = any(fnmatchcase(name, t) for t in trainable) and not any(fnmatchcase(name, f) for f in frozen)
        p.requires_grad_(on)
        if on:
            chosen.append(name)
    if not chosen:
        raise ValueError("no parameter trains in this stage: check train.trainable and train.frozen")
    return chosen

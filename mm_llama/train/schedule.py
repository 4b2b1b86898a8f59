"""Learning-rate schedules (SPEC §2.2–2.3): linear warmup, then cosine to a floor, linear to zero, or constant."""
from __future__ import annotations

import math

from ..config.stage import OptimConfig


def lr_at(step: int, optim: OptimConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    decay_steps = max(total_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / decay_steps, 1.0)
    if optim.schedule == "linear":  # annealing: linearly to zero (SPEC §2.3)
        return optim.lr * (1.0 - progress)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

"""Initialisation for training from scratch (SPEC §2.3 leaves it open; our choice).

Every matrix and the embedding table ~ N(0, 0.02); the two projections that write into the
residual stream (`attention.wo`, `feed_forward.w2`) are scaled by 1/√(2·n_layers), as GPT-2 and
torchtitan do, so the residual variance stays O(1) with depth; norms start at 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .llama import RMSNorm, Transformer

STD = 0.02


@torch.no_grad()
def init_weights(model: Transformer, generator: torch.Generator | None = None) -> Transformer:
    residual_std = STD / math.sqrt(2 * model.args.n_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = residual_std if name.endswith(("attention.wo", "feed_forward.w2")) else STD
            module.weight.normal_(0.0, std, generator=generator)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
    return model

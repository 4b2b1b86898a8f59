"""An exponential-moving-average copy of a model: the updated DPO reference of the paper's vision DPO.

The paper (§7.5.4) updates the vision DPO's reference model "in an exponential moving average (EMA)
fashion every k-steps" instead of keeping it frozen; k and the decay are not given (SPEC §4.2,
UNCONFIRMED). Here, after every `every` optimizer steps, each reference tensor becomes

    ref ← decay · ref + (1 − decay) · policy

so the reference trails the policy and the KL anchor moves with it. The copy holds no gradients.
"""
from __future__ import annotations

import torch
from torch import nn


class EMAReference:
    """`model` (the reference, updated in place) trailing a policy of the same architecture."""

    def __init__(self, model: nn.Module, every: int, decay: float):
        if every < 1 or not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA reference needs every >= 1 and 0 <= decay < 1, got every={every}, decay={decay}")
        self.model = model.requires_grad_(False).eval()
        self.every, self.decay = every, decay
        self.updates = 0  # how many updates the reference has had

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """One EMA step towards `policy`'s current weights (floating-point tensors; buffers included)."""
        source = policy.state_dict()
        for name, ref in self.model.state_dict().items():
            if ref.is_floating_point():
                ref.lerp_(source[name].to(ref.dtype), 1.0 - self.decay)
        self.updates += 1

    def step(self, policy: nn.Module, steps_done: int) -> bool:
        """Called before each optimizer step with the steps already taken; updates when a k-th step is done.

        Idempotent per step (micro-batches of one step call it once each), so the reference after N steps
        depends only on the policy's weights at steps k, 2k, ... ≤ N.
        """
        due = steps_done // self.every
        if due <= self.updates:
            return False
        if due != self.updates + 1:
            raise RuntimeError(f"EMA reference: {self.updates} updates done but {due} due after {steps_done} steps; "
                               "a step was missed (resume without the reference's saved state?)")
        self.update(policy)
        return True

    def state_dict(self) -> dict:
        """The reference's tensors (copied) and the update count: what a checkpoint must hold to resume exactly."""
        return {"updates": self.updates,
                "weights": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.updates = int(state["updates"])

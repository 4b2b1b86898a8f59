"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel ranks.

One FSDP group per Transformer block, then the root (embeddings, final norm, output). Frozen
parameters are sharded like the rest; they get no gradient and, since the optimizer only holds
trainable parameters, no optimizer state. The paper keeps gathered weights after the forward pass
(SPEC §2.4: "not re-sharded after forward"), saving one all-gather in backward; that is the default.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16 parameters in compute with fp32 gradient reduction (the paper's numerics); fp32 does nothing."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, dtype: torch.dtype, reshard_after_forward: bool) -> None:
    """Shard `model` in place; works on a whole `Transformer` or a pipeline stage holding some blocks.

    Gradients are summed, not averaged, over the mesh: the loss is already divided by the token
    count of the whole global batch, so a sum gives the single-process gradient exactly.
    """
    policy = mixed_precision(dtype)
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM

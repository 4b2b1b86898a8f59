"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over the data-parallel ranks.

One FSDP group per block, then the root. For the text LM the blocks are its Transformer blocks; for
the composed models every repeated block `blocks.shard_units` finds (LM, cross-attention, ViT,
Conformer, ...), the rest (embeddings, tile tables, adapters, heads) falling to the root group.
Frozen parameters are sharded like the rest; they get no gradient and, since the optimizer only holds
trainable parameters, no optimizer state. The paper keeps gathered weights after the forward pass
(SPEC §2.4: "not re-sharded after forward"), saving one all-gather in backward; that is the default.

A sharded module gathers its weights only around `forward`; the other methods the models call on a
block or the tasks call on the root (`CrossAttentionBlock.kv`, `SpeechLM.encode_speech`, ...) are
registered with FSDP so that they gather too.

A task's frozen second model (DPO's reference) is laid out like the trained one by `shard_frozen`: the
same TP plan and FSDP units, so it costs 1/dp of its memory on each rank, and no gradients.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

# methods besides `forward` that run a sharded module's weights: a block's (image K/V, once per image)
# and the root's (encoders a task's evaluation calls directly)
FORWARD_METHODS = ("kv", "embed", "encode_images", "encode_videos", "encode_speech", "encode_image", "encode_text")


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy:
    """bf16 parameters in compute with fp32 gradient reduction (the paper's numerics); fp32 does nothing."""
    if dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, dtype: torch.dtype, reshard_after_forward: bool,
               units: list[nn.Module] | None = None) -> list[nn.Parameter]:
    """Shard `model` in place: each of `units` (default: `model.layers`, a `Transformer` or a pipeline stage
    holding some blocks), then the root. Returns the parameters left replicated: the scalars (CLIP's
    `logit_scale`), which FSDP cannot shard; the caller sums their gradients over the mesh.

    Gradients are summed, not averaged, over the mesh: the loss is already divided by the unit count
    of the whole global batch, so a sum gives the single-process gradient exactly.
    """
    policy = mixed_precision(dtype)
    if units is None:
        units = list(model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers)
    scalars = [p for p in model.parameters() if p.ndim == 0]
    for unit in [*units, model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=set(scalars))
        for method in FORWARD_METHODS:
            if callable(getattr(unit, method, None)):
                register_fsdp_forward_method(unit, method)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return scalars


def shard_frozen(model: nn.Module, tp_mesh: DeviceMesh, dp_mesh: DeviceMesh, dtype: torch.dtype) -> nn.Module:
    """Lay out a frozen model (DPO's reference) like the trained one: requires_grad off, the same TP plan
    (`apply_tp_composed` over `tp_mesh`), FSDP per block and root over `dp_mesh` (the trained model's
    FSDP mesh). It never runs backward, so each block reshards right after its forward and the root
    after the whole forward (not after the registered methods, `encode_images`, that run inside it)."""
    from .blocks import shard_units
    from .tensor_parallel import apply_tp_composed

    model.requires_grad_(False).eval()
    if tp_mesh.size() > 1:
        apply_tp_composed(model, tp_mesh)
    if dp_mesh.size() > 1:
        apply_fsdp(model, dp_mesh, dtype, reshard_after_forward=True, units=shard_units(model))
        model.set_reshard_after_forward(False, recurse=False)
        model.register_forward_hook(lambda module, args, output: module.reshard())
    return model

"""Tensor parallelism (Megatron-style, DTensor `parallelize_module`) over the `tp` mesh dimension.

Per LM block: wq/wk/wv and w1/w3 split by output columns, wo and w2 by input rows, so each block needs
one all-reduce after attention and one after the FFN; each rank holds n_heads/tp query heads and
n_kv_heads/tp key/value heads. The embedding is split by vocabulary rows; the output projection by
vocabulary columns, and with `vocab_parallel_loss` the logits stay sharded into the loss
(`loss_parallel`), so the full `[batch, seq, vocab]` logits never exist on one rank.

The composed models (`apply_tp_composed`) add, block type by block type:
- gated cross-attention: the LM block's plan (GQA projections by heads, output by rows, SwiGLU FFN);
  its per-head query/key RMSNorm weights see only this rank's heads, so their gradients are summed
  over the TP group in backward; the tanh gates act on all-reduced outputs and stay replicated;
- the image encoder's open_clip blocks (ViT, global gated layers, the CLIP text tower): the MLP
  (`c_fc` by columns, `c_proj` by rows, biases included). Attention stays replicated on every TP rank:
  open_clip keeps q, k and v in one fused `in_proj_weight` `[3·width, width]` (or inside
  `nn.MultiheadAttention`), whose contiguous row split would give rank 0 all of q and part of k; a
  by-heads split needs a strided layout that would no longer save under the tensor's own name;
- Conformer blocks: attention wq/wk/wv by columns and wo by rows, both macaron FFNs like the LM's;
  the convolution module stays replicated.
Everything else (tile tables, adapters, the video aggregator, heads) is replicated over TP and
sharded over DP by FSDP. Replicated modules see the same inputs on every TP rank, so their gradients
are already complete. Dropout inside a split region draws a different mask than a single process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..config import ConfigError

BLOCK_PLAN = {
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(),
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(),
}
OPEN_CLIP_MLP_PLAN = {"mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
CONFORMER_PLAN = {
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(),
    "ffn1.w1": ColwiseParallel(),
    "ffn1.w2": RowwiseParallel(),
    "ffn2.w1": ColwiseParallel(),
    "ffn2.w2": RowwiseParallel(),
}


def check_tp(args, tp: int) -> None:
    """Heads and FFN width must split evenly; name the field that does not."""
    for name, value in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("hidden_dim", args.hidden_dim)):
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide model.lm.{name} ({value})")


def _split_lm_block(block: nn.Module, mesh: DeviceMesh) -> None:
    parallelize_module(block, mesh, BLOCK_PLAN)
    block.attention.n_heads //= mesh.size()  # the forward views the local projection as local heads
    block.attention.n_kv_heads //= mesh.size()


def _split_embeddings(model: nn.Module, mesh: DeviceMesh, vocab_parallel_loss: bool) -> None:
    if model.args.tie_embeddings:
        return  # one matrix cannot be both the row-split embedding and the column-split output
    if getattr(model, "tok_embeddings", None) is not None:
        parallelize_module(model.tok_embeddings, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if getattr(model, "output", None) is not None:
        layout = Shard(-1) if vocab_parallel_loss else Replicate()
        parallelize_module(model.output, mesh, ColwiseParallel(output_layouts=layout, use_local_output=not vocab_parallel_loss))


def apply_tp(model: nn.Module, mesh: DeviceMesh, vocab_parallel_loss: bool) -> None:
    """Parallelize a `Transformer` (or a pipeline stage of one) in place; parameter names are unchanged."""
    check_tp(model.args, mesh.size())
    for block in model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers:
        _split_lm_block(block, mesh)
    _split_embeddings(model, mesh, vocab_parallel_loss)


class _SumGradOver(torch.autograd.Function):
    """Identity in forward; in backward the gradient is summed over `group`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _head_norm_over(norm: nn.Module, group) -> None:
    """An RMSNorm over each head `[..., heads/tp, head_dim]` whose weight's gradient is summed over the TP group."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = _SumGradOver.apply(norm.weight, group)
        return F.rms_norm(x.float(), weight.shape, eps=norm.eps).type_as(x) * weight

    norm.forward = forward


def _divides(tp: int, value: int, field: str) -> None:
    if value % tp:
        raise ConfigError(f"parallel.tp={tp} does not divide {field} ({value})")


def apply_tp_composed(model: nn.Module, mesh: DeviceMesh) -> None:
    """Parallelize every block of a composed model (or a bare encoder / LM) in place; names are unchanged."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    from adapters.cross_attention import CrossAttentionBlock
    from encoders.speech.conformer import ConformerBlock
    from encoders.vision.encoder import GatedBlock

    from ..model.llama import Transformer, TransformerBlock
    from .blocks import shard_units

    tp = mesh.size()
    for module in list(model.modules()):
        if isinstance(module, Transformer):
            check_tp(module.args, tp)
            _split_embeddings(module, mesh, vocab_parallel_loss=False)
    for unit in shard_units(model):
        if isinstance(unit, TransformerBlock):
            _split_lm_block(unit, mesh)
        elif isinstance(unit, CrossAttentionBlock):
            _split_lm_block(unit, mesh)
            for norm in (unit.attention.q_norm, unit.attention.k_norm):
                _head_norm_over(norm, mesh.get_group())
        elif isinstance(unit, (CustomResidualAttentionBlock, ResidualAttentionBlock, GatedBlock)):
            mlp = unit.block.mlp if isinstance(unit, GatedBlock) else unit.mlp
            _divides(tp, mlp.c_fc.out_features, "the image encoder's MLP width (width · mlp_ratio)")
            parallelize_module(mlp, mesh, {k.removeprefix("mlp."): v for k, v in OPEN_CLIP_MLP_PLAN.items()})
        elif isinstance(unit, ConformerBlock):
            _divides(tp, unit.attention.n_heads, "model.speech.encoder.n_heads")
            _divides(tp, unit.ffn1.w1.out_features, "model.speech.encoder.ffn_dim")
            parallelize_module(unit, mesh, CONFORMER_PLAN)
            unit.attention.n_heads //= tp

"""Tensor parallelism (Megatron-style, DTensor `parallelize_module`) over the `tp` mesh dimension.

Per block: wq/wk/wv and w1/w3 split by output columns, wo and w2 by input rows, so each block needs
one all-reduce after attention and one after the FFN; each rank holds n_heads/tp query heads and
n_kv_heads/tp key/value heads. The embedding is split by vocabulary rows; the output projection by
vocabulary columns, and with `vocab_parallel_loss` the logits stay sharded into the loss
(`loss_parallel`), so the full `[batch, seq, vocab]` logits never exist on one rank.
"""
from __future__ import annotations

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


def check_tp(args, tp: int) -> None:
    """Heads and FFN width must split evenly; name the field that does not."""
    for name, value in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("hidden_dim", args.hidden_dim)):
        if value % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide model.lm.{name} ({value})")


def apply_tp(model: nn.Module, mesh: DeviceMesh, vocab_parallel_loss: bool) -> None:
    """Parallelize a `Transformer` (or a pipeline stage of one) in place; parameter names are unchanged."""
    tp = mesh.size()
    check_tp(model.args, tp)
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        parallelize_module(block, mesh, BLOCK_PLAN)
        block.attention.n_heads //= tp  # the forward views the local projection as local heads
        block.attention.n_kv_heads //= tp
    if model.args.tie_embeddings:
        return  # one matrix cannot be both the row-split embedding and the column-split output
    if getattr(model, "tok_embeddings", None) is not None:
        parallelize_module(model.tok_embeddings, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    if getattr(model, "output", None) is not None:
        layout = Shard(-1) if vocab_parallel_loss else Replicate()
        parallelize_module(model.output, mesh, ColwiseParallel(output_layouts=layout, use_local_output=not vocab_parallel_loss))

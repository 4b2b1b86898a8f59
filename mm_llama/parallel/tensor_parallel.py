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
  (`c_fc` by columns, `c_proj` by rows, biases included) and the attention by heads
  (`split_fused_attention`). open_clip keeps q, k and v in one fused `in_proj_weight` `[3·width, width]`
  (its own `Attention`, or `nn.MultiheadAttention`): its contiguous row split would give rank 0 all of q
  and part of k, and a by-heads (strided) split has no DTensor placement that checkpoints can save. So
  the fused weight and bias stay row-sharded in that plain layout (same name, same full tensor, 1/tp of
  the memory and optimizer state) and each forward all-gathers them (3·width² values, small beside a
  tile sequence's activations) and keeps this rank's heads' rows; backward reduce-scatters their
  gradients. The heads then run as in the LM block: `out_proj` by rows, one all-reduce;
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
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
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


def _local_heads(fused: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """`[3·width, ...]` row-sharded DTensor (q, k, v stacked, heads contiguous in each) → this rank's heads'
    rows `[3·width/tp, ...]` (its q rows, then k, then v). The gradient of the gathered copy holds only
    these rows, so it is marked Partial: backward reduce-scatters it into the shards."""
    full = fused.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
    return full.unflatten(0, (3, tp, -1))[:, rank].flatten(0, 1)


def _local_mask(mask: torch.Tensor | None, n: int, heads: int, tp: int, rank: int, dtype) -> torch.Tensor | None:
    """An attention mask as open_clip passes it (`[L, L]`, `[n·heads, L, L]` or `[n, 1 or heads, L, L]`; bool:
    True = blocked) → additive, for this rank's heads."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if mask.ndim == 3:
        mask = mask.unflatten(0, (n, heads))
    if mask.ndim == 4 and mask.shape[1] == heads:
        mask = mask.unflatten(1, (tp, -1))[:, rank]
    return mask.to(dtype)


def _refuse_variants(attn: nn.Module) -> None:
    """open_clip's options that act on all heads at once or hold per-head parameters are not split."""
    if isinstance(attn, nn.MultiheadAttention):
        odd = {"separate q/k/v projections": not attn._qkv_same_embed_dim,
               "bias_k/bias_v": attn.bias_k is not None, "add_zero_attn": attn.add_zero_attn}
    else:
        odd = {"qk_norm": not isinstance(attn.ln_q, nn.Identity),
               "scaled cosine attention": attn.logit_scale is not None, "scale_heads": attn.head_scale is not None,
               "scale_attn_inner": not isinstance(attn.ln_inner, nn.Identity)}
    used = [k for k, v in odd.items() if v]
    if used:
        raise ConfigError(f"parallel.tp > 1 splits open_clip attention by heads; {', '.join(used)} is not "
                          "supported there (use parallel.tp=1)")


def split_fused_attention(attn: nn.Module, mesh: DeviceMesh) -> None:
    """Split open_clip's fused-q,k,v self-attention (`Attention` or `nn.MultiheadAttention`, batch first or
    not) by heads in place: each rank computes heads/tp heads; `in_proj_weight`/`in_proj_bias` keep their
    names and full tensors (row-sharded in their own layout, gathered for each forward)."""
    tp, rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    heads = attn.num_heads
    _divides(tp, heads, "the heads of an open_clip attention (model.vision.encoder.heads, train.options.text_heads)")
    _refuse_variants(attn)
    for name in ("in_proj_weight", "in_proj_bias"):
        p = getattr(attn, name)
        if p is not None:
            setattr(attn, name, nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)]), p.requires_grad))
    parallelize_module(attn.out_proj, mesh, RowwiseParallel())
    mha = isinstance(attn, nn.MultiheadAttention)

    def heads_forward(x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x `[n, L, width]` (replicated) → `[n, L, width]` (replicated, after out_proj's all-reduce)."""
        n, length, _ = x.shape
        x = _SumGradOver.apply(x, group)  # every rank's heads read x: its gradient is their sum
        bias = None if attn.in_proj_bias is None else _local_heads(attn.in_proj_bias, tp, rank)
        qkv = F.linear(x, _local_heads(attn.in_proj_weight, tp, rank), bias)
        q, k, v = qkv.view(n, length, 3, heads // tp, -1).permute(2, 0, 3, 1, 4)  # 3 × [n, heads/tp, L, head_dim]
        dropout = (attn.dropout if mha else attn.attn_drop.p) if attn.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, _local_mask(attn_mask, n, heads, tp, rank, q.dtype), dropout)
        return attn.out_proj(out.transpose(1, 2).reshape(n, length, -1))  # local heads = Shard(-1) of the width

    if not mha:
        attn.forward = heads_forward
        return

    def mha_forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
        if key is not query or value is not query or key_padding_mask is not None or need_weights or is_causal:
            raise NotImplementedError("a head-split nn.MultiheadAttention runs self-attention only, with an explicit "
                                      "attn_mask, no key_padding_mask and need_weights=False (open_clip's call)")
        x = query if attn.batch_first else query.transpose(0, 1)
        out = heads_forward(x, attn_mask)
        return (out if attn.batch_first else out.transpose(0, 1)), None

    attn.forward = mha_forward


def apply_tp_composed(model: nn.Module, mesh: DeviceMesh) -> None:
    """Parallelize every block of a composed model (or a bare encoder / LM, or a pipeline stage of one) in place;
    names are unchanged."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    from adapters.cross_attention import CrossAttentionBlock
    from encoders.speech.conformer import ConformerBlock
    from encoders.vision.encoder import GatedBlock

    from ..model.llama import Transformer, TransformerBlock
    from .blocks import shard_units
    from .pipeline import StageModule

    tp = mesh.size()
    for module in list(model.modules()):
        if isinstance(module, (Transformer, StageModule)):  # a pipeline stage holds the embedding or output, or neither
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
            block = unit.block if isinstance(unit, GatedBlock) else unit
            _divides(tp, block.mlp.c_fc.out_features, "the image encoder's MLP width (width · mlp_ratio)")
            parallelize_module(block.mlp, mesh, {k.removeprefix("mlp."): v for k, v in OPEN_CLIP_MLP_PLAN.items()})
            split_fused_attention(block.attn, mesh)
        elif isinstance(unit, ConformerBlock):
            _divides(tp, unit.attention.n_heads, "model.speech.encoder.n_heads")
            _divides(tp, unit.ffn1.w1.out_features, "model.speech.encoder.ffn_dim")
            parallelize_module(unit, mesh, CONFORMER_PLAN)
            unit.attention.n_heads //= tp

"""Context parallelism the paper's way (SPEC §2.4): all-gather K and V, attend with the local queries.

The sequence is cut into 2·cp chunks and rank i keeps chunks i and 2·cp−1−i, so every rank holds
an equal share of the causal triangle's work. Each block computes q, k, v for its own tokens,
all-gathers k and v over the CP group (small under GQA) and runs attention for its queries against
the whole sequence with an explicit mask, so any mask — the document mask included — is exact.
(torch's experimental ring `context_parallel` supports only plain causal masks.)

Installed on an unmodified `Transformer`: its `prepare` is replaced (on the instance) by one that
builds rotary tables and mask rows for the local tokens from the *full* document ids, and each
attention module's `forward` by the all-gather version. Parameter names do not change.

The composed models (`apply_cp_composed`: image/video `MultimodalModel`, `SpeechLM`, or an LM under a
task's loss) are given the *whole* token sequence, so everything that reads it whole stays as it is:
the `<|image|>`/`<|video|>` masks, the speech splice, the media encoders (each CP rank encodes every
image, clip or video of the batch: the encoders are not sequence-split). The split happens after the
embedding: `embed` keeps this rank's rows, every gated cross-attention block takes its query rows of
the full-sequence mask, and the task's labels are cut the same way (`ComposedCP.local_batch`), so the
logits and the loss cover this rank's tokens only. The switch is on for training steps and off for
evaluation (`ComposedCP.disabled`), which then runs the whole sequence on every rank as one process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_tensor_autograd
from torch.distributed.device_mesh import DeviceMesh

from ..config import ConfigError
from ..model.masks import AttentionMask, document_positions
from ..model.rope import apply_rotary
from ..train.losses import IGNORE


def local_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Sequence positions `[seq_len / cp]` held by CP rank `rank`: chunks `rank` and `2·cp−1−rank`."""
    if seq_len % (2 * cp):
        raise ConfigError(f"train.seq_len ({seq_len}) must be a multiple of 2·parallel.cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    idx = torch.arange(seq_len, device=device).view(2 * cp, chunk)
    return torch.cat([idx[rank], idx[2 * cp - 1 - rank]])


def gathered_index(seq_len: int, cp: int, device=None) -> torch.Tensor:
    """Sequence positions `[seq_len]` of the keys in all-gather order (rank 0's tokens, then rank 1's, ...)."""
    return torch.cat([local_index(seq_len, cp, r, device) for r in range(cp)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of `x` along `dim` (the sequence): `[batch, seq, ...]` → `[batch, seq / cp, ...]`."""
    return x.index_select(dim, local_index(x.shape[dim], cp, rank, x.device))


def _prepare(model: nn.Module, cp: int, rank: int, full_tokens: bool = False):
    def prepare(tokens: torch.Tensor, doc_ids=None, positions=None, start_pos: int = 0):
        """tokens `[batch, seq/cp]` (local; `[batch, seq]` with `full_tokens`), doc_ids `[batch, seq]` (full)
        → local rotary, mask `[batch, 1, seq/cp, seq]`."""
        if start_pos or positions is not None:
            raise ValueError("context parallelism is for training: no KV cache or explicit positions")
        b, t = tokens.shape[0], tokens.shape[1] * (1 if full_tokens else cp)
        if doc_ids is None:
            doc_ids = torch.zeros(b, t, dtype=torch.long, device=tokens.device)
        q_at = local_index(t, cp, rank, tokens.device)
        k_at = gathered_index(t, cp, tokens.device)
        cos, sin = model.rotary(document_positions(doc_ids)[:, q_at])
        same_doc = doc_ids[:, q_at, None] == doc_ids[:, None, k_at]
        causal = k_at[None, :] <= q_at[:, None]
        return (cos, sin), AttentionMask((same_doc & causal)[:, None])

    return prepare


def _all_gather_attention(group: DeviceMesh):
    def forward(self, x, cos, sin, mask: AttentionMask, cache=None, start_pos: int = 0):
        """x `[batch, seq/cp, dim]` → `[batch, seq/cp, dim]`; keys and values from every CP rank."""
        b, t, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [batch, heads, seq/cp, head_dim]
        k = all_gather_tensor_autograd(k.contiguous(), gather_dim=2, group=group)  # [batch, kv_heads, seq, head_dim]
        v = all_gather_tensor_autograd(v.contiguous(), gather_dim=2, group=group)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    return forward


def apply_cp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Install all-gather context parallelism on a `Transformer` in place (see the module docstring)."""
    cp, rank = mesh.size(), mesh.get_local_rank()
    model.prepare = _prepare(model, cp, rank)
    attend = _all_gather_attention(mesh)
    for block in model.layers:
        block.attention.forward = types.MethodType(attend, block.attention)


# ------------------------------------------------------------------------------------------ composed models

class ComposedCP:
    """CP installed on a composed model: which rank holds which rows, and the switch between the CP
    forward (training steps) and the whole-sequence forward (evaluation, generation)."""

    def __init__(self, cp: int, rank: int, pad_id: int):
        self.cp, self.rank, self.pad_id, self.active = cp, rank, pad_id, True
        self.in_forward = False  # inside the model's own forward (a task may call `embed` for other ends)

    @contextlib.contextmanager
    def disabled(self):
        """Every rank runs the whole sequence (held-out evaluation: the same batches on every rank)."""
        self.active = False
        try:
            yield
        finally:
            self.active = True

    def local_batch(self, batch):
        """The batch as a CP rank feeds it to the task: tokens (and doc_ids) whole but right-padded to a multiple
        of 2·cp (pad token, no label; a padded position follows the last real one, so causal attention keeps it
        from every real row), labels `[batch, seq / cp]` this rank's."""
        t = batch.tokens.shape[1]
        pad = -t % (2 * self.cp)
        changes = {}
        labels = batch.labels
        if pad:
            changes["tokens"] = F.pad(batch.tokens, (0, pad), value=self.pad_id)
            labels = F.pad(labels, (0, pad), value=IGNORE)
            if getattr(batch, "doc_ids", None) is not None:
                changes["doc_ids"] = torch.cat([batch.doc_ids, batch.doc_ids[:, -1:].expand(-1, pad)], dim=1)
        changes["labels"] = shard_sequence(labels, self.cp, self.rank)
        return dataclasses.replace(batch, **changes)

    def rows(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return shard_sequence(x, self.cp, self.rank, dim)


def _switched(cp: ComposedCP, obj, name: str, parallel) -> None:
    """Replace `obj.name` (on the instance) by `parallel` while `cp.active`, the original otherwise."""
    original = getattr(obj, name)

    def call(*args, **kwargs):
        return (parallel if cp.active else original)(*args, **kwargs)

    setattr(obj, name, call)


def _cross_attention_rows(cp: ComposedCP, forward):
    def local(x, kv, bias, row_mask):
        """x `[batch, seq/cp, dim]` (local); bias `[batch, 1, seq, n_media_tokens]`, row_mask `[batch, seq, 1]`
        (the whole sequence's) → this rank's query rows of both."""
        return forward(x, kv, cp.rows(bias, dim=2), cp.rows(row_mask))

    return local


def apply_cp_composed(model: nn.Module, mesh: DeviceMesh, pad_id: int) -> ComposedCP:
    """Install all-gather CP on a composed model (`lm` + `embed`: `MultimodalModel`, `SpeechLM`) or a bare
    `Transformer`, in place; see the module docstring. `pad_id` pads a batch to a multiple of 2·cp."""
    from adapters.cross_attention import CrossAttentionBlock

    from ..model import Transformer

    cp = ComposedCP(mesh.size(), mesh.get_local_rank(), pad_id)
    lm = model if isinstance(model, Transformer) else model.lm
    _switched(cp, lm, "prepare", _prepare(lm, cp.cp, cp.rank, full_tokens=True))
    attend = _all_gather_attention(mesh)
    for block in lm.layers:
        _switched(cp, block.attention, "forward", types.MethodType(attend, block.attention))
    if lm is model:  # the bare LM embeds inside its forward: keep this rank's rows of the embedding's output
        lm.tok_embeddings.register_forward_hook(lambda module, args, out: cp.rows(out) if cp.active else out)
    else:  # after `embed`, which reads the whole sequence (image token row, speech splice), in the model's forward
        embed = model.embed
        _switched(cp, model, "embed",
                  lambda *args, **kwargs: cp.rows(embed(*args, **kwargs)) if cp.in_forward else embed(*args, **kwargs))
        model.register_forward_pre_hook(lambda module, args: setattr(cp, "in_forward", True))
        model.register_forward_hook(lambda module, args, out: setattr(cp, "in_forward", False), always_call=True)
    for module in model.modules():
        if isinstance(module, CrossAttentionBlock):
            _switched(cp, module, "forward", _cross_attention_rows(cp, module.forward))
    return cp

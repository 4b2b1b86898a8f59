"""Per-GPU memory plan for a model and a 4D layout: parameters, gradients, optimizer state, activations.

The model the numbers follow is the paper's 405B setup (SPEC §2.4): bf16 weights in compute, fp32
master weights, fp32 gradients and two fp32 AdamW moments, all sharded by FSDP over the DP·CP ranks;
bf16 weights of a stage stay gathered after forward (not re-sharded). Activations per layer and
micro-batch are `34 · s · b · dim / tp` bytes (Korthikanti et al. 2022 with sequence parallelism and
a fused attention kernel that stores no `s²` scores), with s the tokens a CP rank holds. Under 1F1B
the first stage holds `min(pp, micro-batches)` micro-batches in flight; stages are balanced as in
`pipeline.split_layers` (embedding and output count as one layer each). The worst stage is reported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model.args import LlamaArgs
from .pipeline import split_layers

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU on the fullest pipeline stage."""

    stage: int
    parameters: float  # bf16 weights gathered for compute
    master: float  # fp32 master weights, FSDP-sharded
    gradients: float  # fp32, FSDP-sharded
    optimizer: float  # AdamW moments (fp32), FSDP-sharded
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.master + self.gradients + self.optimizer + self.activations

    def as_gib(self) -> dict[str, float]:
        return {**{k: v / GIB for k, v in asdict(self).items() if k != "stage"}, "total": self.total / GIB, "stage": self.stage}


def layer_params(args: LlamaArgs) -> int:
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads)
    return attn + 3 * args.dim * args.hidden_dim + 2 * args.dim


def plan(args: LlamaArgs, *, tp: int, cp: int, pp: int, dp: int, seq_len: int, batch_per_dp: int,
         micro_batch: int = 1) -> MemoryPlan:
    """The memory of the fullest stage for `batch_per_dp` sequences of `seq_len` per DP rank per step."""
    for name, v in (("tp", tp), ("cp", cp), ("pp", pp), ("dp", dp), ("seq_len", seq_len), ("batch_per_dp", batch_per_dp)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if seq_len % cp:
        raise ValueError(f"seq_len {seq_len} is not divisible by cp={cp}")
    stages = split_layers(args.n_layers, pp)
    microbatches = max(1, batch_per_dp // micro_batch)
    table = args.vocab_size * args.dim
    best = None
    for s, layers in enumerate(stages):
        n = len(layers) * layer_params(args) + (table if s == 0 else 0) + (table + args.dim if s == pp - 1 else 0)
        local = n / tp
        in_flight = min(pp - s, microbatches)
        tokens = micro_batch * seq_len / cp
        act = 34 * tokens * args.dim / tp * len(layers) * in_flight
        if s == pp - 1:  # fp32 logits of one micro-batch, split over the vocabulary
            act += 4 * tokens * args.vocab_size / tp
        shard = local / (dp * cp)
        p = MemoryPlan(s, 2 * local, 4 * shard, 4 * shard, 8 * shard, act)
        if best is None or p.total > best.total:
            best = p
    return best

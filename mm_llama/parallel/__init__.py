"""4D parallelism for the training engine (SPEC §2.4): FSDP2, tensor, pipeline and context parallelism
over one DeviceMesh in the paper's order [TP, CP, PP, DP], plus DCP checkpoints and a memory planner.

The model files know nothing of this: each step here parallelizes an ordinary `Transformer` in place
(torchtitan's split between `model.py` and `parallelize.py`)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config.stage import StageConfig
from .mesh import MESH_DIMS, ParallelDims, build_mesh, init_distributed
from .runtime import ParallelRun


def start(cfg: StageConfig, device: torch.device) -> tuple[int, ParallelDims]:
    """Join the torchrun job (process group with `parallel.timeout_s`) and resolve the layout; returns (rank, dims)."""
    world = int(os.environ["WORLD_SIZE"])
    dims = ParallelDims.resolve(cfg.parallel, world)  # fail on a bad layout before waiting on other ranks
    rank, _ = init_distributed(cfg.parallel.timeout_s, device.type)
    global _MONITOR
    # a group of its own: a collective that timed out closes the connections of the group it ran in
    _MONITOR = dist.new_group(backend="gloo")
    return rank, dims


_MONITOR = None


class RankFailure(RuntimeError):
    """A rank failed or timed out in a collective; the message names the rank and, where known, the stuck ones."""


def describe_failure(error: BaseException, probe_s: float = 10.0) -> str:
    """`rank R of W failed: ...`, plus the ranks that do not answer a monitored barrier."""
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    message = f"rank {rank} of {world} failed: {type(error).__name__}: {error}"
    if _MONITOR is not None:
        try:
            dist.monitored_barrier(_MONITOR, timeout=timedelta(seconds=probe_s), wait_all_ranks=True)
        except RuntimeError as probe:
            message += f"\nranks that did not answer within {probe_s:g} s: {probe}"
    return message


__all__ = ["RankFailure", "describe_failure", "MESH_DIMS", "ParallelDims", "ParallelRun", "build_mesh", "init_distributed", "start"]

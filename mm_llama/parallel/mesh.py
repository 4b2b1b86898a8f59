"""The process group and the DeviceMesh in the paper's order [TP, CP, PP, DP], innermost first (SPEC §2.4).

`init_device_mesh` lists dimensions outermost first, so the mesh is `("dp", "pp", "cp", "tp")`: the
TP group is made of consecutive ranks (inside one server, on NVLink) and DP spans the farthest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError
from ..config.stage import ParallelConfig

MESH_DIMS = ("dp", "pp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees; `dp * pp * cp * tp == world`."""

    dp: int
    pp: int
    cp: int
    tp: int

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        """Fill `dp_shard=-1` from the world size; name the fields when the product does not fit."""
        inner = cfg.tp * cfg.cp * cfg.pp
        dp = cfg.dp_shard
        if dp == -1:
            if world_size % inner:
                raise ConfigError(f"parallel: tp·cp·pp = {cfg.tp}·{cfg.cp}·{cfg.pp} = {inner} does not divide "
                                  f"the {world_size} ranks (WORLD_SIZE)")
            dp = world_size // inner
        if dp * inner != world_size:
            raise ConfigError(f"parallel: dp_shard·pp·cp·tp = {dp}·{cfg.pp}·{cfg.cp}·{cfg.tp} = {dp * inner} "
                              f"but WORLD_SIZE is {world_size}")
        return cls(dp=dp, pp=cfg.pp, cp=cfg.cp, tp=cfg.tp)


def init_distributed(timeout_s: float, device_type: str) -> tuple[int, int]:
    """Start the default process group from torchrun's environment; return (rank, world_size).

    gloo on CPU, nccl on CUDA. Every collective that waits longer than `timeout_s` raises instead of
    hanging (`TORCH_NCCL_ASYNC_ERROR_HANDLING` makes nccl tear the job down the same way).
    """
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """A 4-D mesh named `("dp", "pp", "cp", "tp")`; `mesh["dp", "cp"]` is the group FSDP shards over."""
    return init_device_mesh(device_type, (dims.dp, dims.pp, dims.cp, dims.tp), mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """DP and CP ranks together: CP ranks hold different tokens of one sequence, so their gradients are summed too."""
    if mesh["cp"].size() == 1:
        return mesh["dp"]
    return mesh["dp", "cp"]._flatten("dp_cp")

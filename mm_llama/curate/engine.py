"""Running one function over many shards: all cores of this machine by default
(`concurrent.futures`), or Dask (`engine: dask`, the `curate-dask` extra) beyond one machine.
No scheduler of our own: the per-shard functions are plain picklable functions of one task."""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, TypeVar

from ..config import ConfigError
from .config import CurateConfig

T = TypeVar("T")
R = TypeVar("R")


def default_workers(config: CurateConfig) -> int:
    if config.workers:
        return config.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_shards(fn: Callable[[T], R], tasks: list[T], config: CurateConfig) -> list[R]:
    """`[fn(t) for t in tasks]`, in order, run in parallel by the configured engine."""
    if not tasks:
        return []
    workers = default_workers(config)
    if config.engine == "dask":
        try:
            import dask.bag as db
        except ImportError as e:
            raise ConfigError("engine: dask needs the curate-dask extra: pip install 'mm_llama[curate-dask]'") from e
        bag = db.from_sequence(tasks, npartitions=len(tasks)).map(fn)
        if config.dask_address:
            from dask.distributed import Client

            with Client(config.dask_address) as client:
                return list(bag.compute(scheduler=client))
        import dask

        # fork, like the local engine: spawn would re-import torch in every worker for each pass.
        with dask.config.set({"multiprocessing.context": "fork" if os.name == "posix" else "spawn"}):
            return list(bag.compute(scheduler="processes", num_workers=min(workers, len(tasks))))
    if workers == 1 or len(tasks) == 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        return list(pool.map(fn, tasks))

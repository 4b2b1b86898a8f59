"""Shared-memory batch buffers that DataLoader workers reuse once the main process no longer holds them.

A batch built in a worker reaches the main process in shared memory. A fresh buffer per batch makes the kernel
allocate and zero every page of it on first touch and free it again after use (0.46 ms of CPU per 0.6 MB image,
against 0.07 ms to rewrite memory already touched; docs/BENCHMARKS.md). Here each worker process keeps a few
buffers (`BufferPool.per_worker`) and writes a batch into one whose flag says it is free.

Lifetime: a buffer is lent when a worker takes it and becomes free only when the main process says so
(`BufferPool.release_unused`), which it does only when its own reference is the storage's last one: every tensor,
view or array that can read the memory holds a reference to the storage, so at that point nothing in the main
process can see the batch change. Batches in flight (prefetched, not yet received) stay lent. When no buffer is
free (the consumer keeps many batches), a worker allocates a fresh one, as without a pool.

`keep_freed_memory`: a worker holds a whole batch of decoded images until it collates them; glibc then hands the
freed heap back to the kernel and the next batch's decodes fault every page in again (about 100 page faults per
448×336 image). Workers keep their freed memory instead, as the limit's single-image loop does by itself.
"""
from __future__ import annotations

import ctypes
import logging

import torch

log = logging.getLogger("mm_llama.data")

_POOL: tuple["BufferPool", int] | None = None  # in a worker process: its pool and worker id
_LENT: list[tuple[int, int, torch.UntypedStorage]] = []  # buffers taken for the batch being built


class BufferPool:
    """`per_worker` reusable buffers for each of `workers` worker processes; flags in shared memory (1 = lent)."""

    def __init__(self, workers: int, per_worker: int):
        self.per_worker = per_worker
        self.flags = torch.zeros(workers, per_worker, dtype=torch.uint8).share_memory_()
        self._buffers: list[torch.UntypedStorage | None] = [None] * per_worker  # this worker's, after `enter`
        self._held: list[tuple[int, int, torch.UntypedStorage]] = []  # main process: buffers lent to the consumer

    def enter(self, worker: int) -> None:
        """In worker process `worker` (its DataLoader id): `shared_storage` takes buffers from this pool."""
        global _POOL
        _POOL = (self, worker)
        _LENT.clear()

    def take(self, worker: int, nbytes: int) -> torch.UntypedStorage | None:
        flags = self.flags[worker]
        for k in range(self.per_worker):
            if flags[k] == 0:
                buffer = self._buffers[k]
                if buffer is None or buffer.nbytes() < nbytes:  # a larger batch than before: a larger buffer
                    buffer = self._buffers[k] = torch.UntypedStorage._new_shared(nbytes)
                flags[k] = 1
                _LENT.append((worker, k, buffer))
                return buffer
        return None

    def hold(self, lent: list[tuple[int, int, torch.UntypedStorage]]) -> None:
        """Main process, while the received batch is referenced: the buffers it was built in (`take_lent`'s list).

        A buffer received as a storage of its own rather than the batch's (nothing else references it yet: the
        batch holds a copy, or the storage was mapped twice) is never freed, so its worker allocates instead.
        """
        self._held += [(w, k, storage) for w, k, storage in lent if _references(storage) > 1]

    def release_unused(self) -> None:
        """Main process: free the buffers that nothing but this pool references any more."""
        keep = []
        for worker, k, storage in self._held:
            if _references(storage) == 1:  # ours is the last one
                self.flags[worker, k] = 0
            else:
                keep.append((worker, k, storage))
        self._held = keep


def keep_freed_memory() -> None:
    """In a loader worker: glibc keeps freed heap memory for the next batch rather than returning it to the kernel
    (`M_TRIM_THRESHOLD`) and serves large blocks from that heap (`M_MMAP_THRESHOLD` at its maximum, 32 MiB).
    Elsewhere (another C library) a no-op."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (mallopt(M_TRIM_THRESHOLD, 2**30) and mallopt(M_MMAP_THRESHOLD, 32 * 2**20)):
        log.debug("mallopt refused: loader workers return freed memory to the kernel")


def _references(storage: torch.UntypedStorage) -> int:
    """How many tensors, views and storage objects hold this storage (this Python object counts once). A private
    torch function: tests/test_tile_into_batch.py fails (held batches overwritten) if its meaning changes."""
    return torch._C._storage_Use_Count(storage._cdata)


def shared_storage(nbytes: int) -> torch.UntypedStorage:
    """A shared-memory storage of at least `nbytes` bytes: a free buffer of this worker's pool, else a new one."""
    if _POOL is not None:
        pool, worker = _POOL
        buffer = pool.take(worker, nbytes)
        if buffer is not None:
            return buffer
    return torch.UntypedStorage._new_shared(nbytes)


def take_lent() -> list[tuple[int, int, torch.UntypedStorage]]:
    """In a worker: the buffers taken since the last call, to send with the batch (`BufferPool.hold`)."""
    lent = list(_LENT)
    _LENT.clear()
    return lent

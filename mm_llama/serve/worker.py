"""One generation thread for the server: requests wait in a FIFO queue and never share state.

The model runs in a single background thread (generation is CPU/GPU-bound and must not block the
event loop). Each call to the generator gets its own KV cache, so requests cannot see each other's.
Requests waiting together with identical sampling settings (and no seed, whose stream of random numbers
belongs to one request) are generated as one batch of up to `max_batch` rows.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field

from ..infer.generate import Completion, Generator, Prompt, TokenEvent
from ..infer.sampling import SamplingConfig


class QueueFull(RuntimeError):
    """More requests are waiting than `max_queue` allows."""


@dataclass(eq=False)
class Job:
    """One request: its events ("text", str), ("done", Completion) or ("error", Exception) arrive on `events`."""

    prompt: Prompt
    config: SamplingConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class GenerationWorker:
    def __init__(self, generator: Generator, max_batch: int = 8, max_queue: int = 64):
        self.generator = generator
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mm-llama-generation", daemon=True)
        self._thread.start()

    def submit(self, prompt: Prompt, config: SamplingConfig) -> Job:
        """Queue a request (call from the event loop); raises `QueueFull` past `max_queue` waiting."""
        job = Job(prompt, config, asyncio.get_running_loop())
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=60)

    def _next_batch(self) -> list[Job] | None:
        with self._wake:
            while not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            first = self._waiting.popleft()
            batch = [first]
            if first.config.seed is None:
                for job in list(self._waiting):
                    if len(batch) == self.max_batch:
                        break
                    if job.config == first.config:
                        self._waiting.remove(job)
                        batch.append(job)
            return [job for job in batch if not job.cancelled.is_set()]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            if not batch:
                continue

            def on_token(event: TokenEvent, batch=batch) -> bool:
                job = batch[event.row]
                if event.text:
                    job.emit("text", event.text)
                return not job.cancelled.is_set()

            try:
                completions: list[Completion] = self.generator.generate([j.prompt for j in batch], batch[0].config,
                                                                        on_token)
            except Exception as e:  # noqa: BLE001 - every waiting request must hear why it failed
                for job in batch:
                    job.emit("error", e)
                continue
            for job, completion in zip(batch, completions):
                job.emit("done", completion)

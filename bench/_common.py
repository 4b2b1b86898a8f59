"""Small helpers shared by the benchmark scripts: threads, interleaved timing, machine and commit.

Import this module before torch: OpenMP reads `OMP_WAIT_POLICY` once, when torch loads it, and its
default busy-waiting makes multi-threaded CPU timings stall intermittently on small shared machines.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402


def set_threads(n: int) -> int:
    """Use `n` intra-op threads (one inter-op thread); returns what torch reports back."""
    if n < 1:
        raise ValueError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started in this process
        pass
    return torch.get_num_threads()


@dataclass
class Timings:
    """Seconds per call of one measured function: wall clock and this process's CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, Timings]:
    """Call every function `warmup` times, then `repeats` rounds of one call each in turn (a, b, a, b, …).

    Interleaving spreads the drift of a shared machine evenly over the contenders; compare medians.
    """
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: Timings() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            out[name].cpu.append(time.process_time() - cpu)
            out[name].wall.append(time.perf_counter() - wall)
    return out


def cpu_model() -> str:
    """`lscpu`'s model name, or the platform's processor string where lscpu is missing."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def git_commit() -> str:
    """Short hash of HEAD, with `+dirty` when the working tree has uncommitted changes.

    `MM_LLAMA_COMMIT` overrides it, for copies of the tree without their git history (a lent GPU machine)."""
    if os.environ.get("MM_LLAMA_COMMIT"):
        return os.environ["MM_LLAMA_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, str]:
    """What a reader needs to place a figure: date, CPU, core count, threads, library versions, commit."""
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)

"""`metrics.jsonl` (one JSON object per optimizer step) and what a person watching the run sees."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Append-only JSON lines; on resume, lines after the checkpoint's step are dropped (they will be redone)."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = self.read(path) if path.exists() else []
        kept = [r for r in rows if r.get("step", 0) <= resume_step]
        if len(kept) != len(rows):
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(path, "a", encoding="utf-8")

    @staticmethod
    def read(path: Path) -> list[dict]:
        rows = []
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
        return rows

    def write(self, row: dict) -> None:
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class Progress:
    """A tqdm bar with ETA on a terminal; plain log lines every `log_every` steps otherwise."""

    def __init__(self, total: int, start: int, log_every: int, name: str):
        self.interactive = sys.stderr.isatty()
        self.log_every, self.name, self.total = log_every, name, total
        self.bar = tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True) if self.interactive else None

    def update(self, row: dict) -> None:
        summary = f"loss {row['loss']:.4f} lr {row['lr']:.2e} tok/s {row['tokens_per_s']:.0f}"
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)
            self.bar.update(1)
        elif row["step"] % self.log_every == 0 or row["step"] == self.total:
            print(f"[{self.name}] step {row['step']}/{self.total} {summary}", flush=True)

    def note(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(f"[{self.name}] {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

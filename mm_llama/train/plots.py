"""Loss and learning-rate curves of a run, as a PNG beside its metrics."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(rows: list[dict], out: Path, title: str) -> Path:
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot(steps, [r["loss"] for r in rows], label="train", lw=1)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="held-out", ms=3)
    ax_loss.set(xlabel="step", ylabel="loss", title=f"{title}: loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

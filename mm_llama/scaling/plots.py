"""IsoFLOP curves with their parabolas, and the fitted compute-optimal line."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .laws import IsoFlopMinimum, PowerLaw  # noqa: E402


def plot_isoflops(runs: list[dict], minima: list[IsoFlopMinimum], law: PowerLaw, out: Path) -> Path:
    fig, (ax_iso, ax_law) = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(minima)))
    for colour, m in zip(colours, minima):
        pts = sorted((r["tokens"], r["loss"]) for r in runs if float(r["flops"]) == m.flops)
        ax_iso.scatter(*zip(*pts), color=colour, s=14)
        x = np.linspace(np.log10(pts[0][0]) - 0.1, np.log10(pts[-1][0]) + 0.1, 100)
        ax_iso.plot(10 ** x, np.polyval(m.coefficients, x), color=colour, label=f"{m.flops:.1e} FLOPs")
        ax_iso.scatter([m.tokens], [m.loss], marker="*", s=80, color=colour, edgecolor="k")
    ax_iso.set(xscale="log", xlabel="training tokens", ylabel="validation loss", title="IsoFLOP curves")
    ax_iso.legend(fontsize=7)
    c = np.array([m.flops for m in minima])
    ax_law.scatter(c, [m.tokens for m in minima], color="k", zorder=3)
    grid = np.logspace(np.log10(c.min()) - 0.3, np.log10(c.max()) + 0.3, 50)
    ax_law.plot(grid, law.tokens(grid), label=f"D* = {law.A:.3g}·C^{law.alpha:.3f}")
    ax_law.set(xscale="log", yscale="log", xlabel="compute (FLOPs)", ylabel="compute-optimal tokens", title="fit")
    ax_law.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

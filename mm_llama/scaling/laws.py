"""Scaling laws as the paper fits them (SPEC §2.2).

IsoFLOP curves: for each compute budget C, fit a second-degree polynomial of validation loss against
log training tokens; its minimum is the compute-optimal token count D*(C). Then fit D*(C) = A·C^α by least
squares in log space. Model size follows from C = 6·N·D. Downstream: a linear fit of normalised NLL against
log FLOPs, then a sigmoid from NLL to accuracy.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# The paper's Figure 3 legend (the rounded text values 0.53 / 0.29 reproduce its 16.55T poorly; SPEC §2.2).
PAPER_ALPHA, PAPER_A = 0.537, 0.299


@dataclass(frozen=True)
class IsoFlopMinimum:
    flops: float
    tokens: float  # compute-optimal training tokens D*(C)
    loss: float  # the fitted parabola's minimum
    coefficients: tuple[float, float, float]  # loss = a·x² + b·x + c with x = log10(tokens)


@dataclass(frozen=True)
class PowerLaw:
    alpha: float
    A: float

    def tokens(self, flops: float) -> float:
        return self.A * flops ** self.alpha

    def params(self, flops: float) -> float:
        return flops / (6.0 * self.tokens(flops))


def isoflop_minima(runs: list[dict]) -> list[IsoFlopMinimum]:
    """Runs `{flops, tokens, loss}` grouped by budget → the parabola minimum of each budget (≥ 3 runs each)."""
    by_budget: dict[float, list[dict]] = defaultdict(list)
    for r in runs:
        by_budget[float(r["flops"])].append(r)
    minima = []
    for flops, group in sorted(by_budget.items()):
        if len(group) < 3:
            raise ValueError(f"budget {flops:.3g} has {len(group)} runs; a parabola needs at least 3")
        x = np.log10([g["tokens"] for g in group])
        y = np.array([g["loss"] for g in group], dtype=float)
        a, b, c = np.polyfit(x, y, 2)
        if a <= 0:
            raise ValueError(f"budget {flops:.3g}: loss is not convex in log tokens (a={a:.3g}); widen the size grid")
        x_min = -b / (2 * a)
        minima.append(IsoFlopMinimum(flops, float(10 ** x_min), float(c - b * b / (4 * a)), (float(a), float(b), float(c))))
    return minima


def fit_power_law(minima: list[IsoFlopMinimum]) -> PowerLaw:
    """Least squares of log D* = log A + α log C."""
    if len(minima) < 2:
        raise ValueError("fitting A·C^α needs at least 2 compute budgets")
    alpha, log_a = np.polyfit(np.log([m.flops for m in minima]), np.log([m.tokens for m in minima]), 1)
    return PowerLaw(float(alpha), float(np.exp(log_a)))


def sigmoid(nll, low, high, scale, mid):
    return low + (high - low) / (1.0 + np.exp(scale * (np.asarray(nll) - mid)))


@dataclass(frozen=True)
class DownstreamForecast:
    """FLOPs → normalised NLL (linear in log FLOPs) → accuracy (sigmoid), fitted separately (SPEC §2.2)."""

    slope: float
    intercept: float
    sigmoid_params: tuple[float, float, float, float]

    def nll(self, flops):
        return self.slope * np.log10(flops) + self.intercept

    def accuracy(self, flops):
        return sigmoid(self.nll(flops), *self.sigmoid_params)


def fit_downstream(flops, nll, nll_for_accuracy, accuracy) -> DownstreamForecast:
    """Stage 1 on (flops, nll) of compute-optimal models; stage 2 on (nll, accuracy) of any models."""
    from scipy.optimize import curve_fit

    slope, intercept = np.polyfit(np.log10(flops), nll, 1)
    acc = np.asarray(accuracy, dtype=float)
    x = np.asarray(nll_for_accuracy, dtype=float)
    start = (acc.min(), acc.max(), 4.0 / max(np.ptp(x), 1e-6), float(np.median(x)))
    params, _ = curve_fit(sigmoid, x, acc, p0=start, maxfev=20000)
    return DownstreamForecast(float(slope), float(intercept), tuple(float(p) for p in params))

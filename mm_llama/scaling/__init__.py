"""Scaling laws: IsoFLOP sweeps through the engine, the paper's fits, and predictions."""
from .laws import PAPER_A, PAPER_ALPHA, DownstreamForecast, PowerLaw, fit_downstream, fit_power_law, isoflop_minima

__all__ = ["PAPER_A", "PAPER_ALPHA", "DownstreamForecast", "PowerLaw", "fit_downstream", "fit_power_law", "isoflop_minima"]

"""Post-training beyond the training stages (SPEC §3): model averaging, rejection sampling, the EMA reference."""
from .average import average_models, average_states, read_model
from .ema import EMAReference

__all__ = ["EMAReference", "average_models", "average_states", "read_model"]

"""Post-training beyond the training stages (SPEC §3): model averaging and rejection sampling."""
from .average import average_models, average_states, read_model

__all__ = ["average_models", "average_states", "read_model"]

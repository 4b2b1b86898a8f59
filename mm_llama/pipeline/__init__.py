"""Stage graphs: ordering, selection, running, and the final report."""
from .graph import PipelineConfig, PipelineStage, load_pipeline, select, stage_order, stage_overrides

__all__ = ["PipelineConfig", "PipelineStage", "load_pipeline", "select", "stage_order", "stage_overrides"]

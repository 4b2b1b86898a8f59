"""A pipeline config: a graph of stages (DESIGN.md principle 3), run in dependency order.

`init_from: S` makes a stage start from stage S's output (and depend on it); `inputs: {key: S}` sets
any other config key to stage S's run directory (e.g. `train.options.encoder_from`); `after: [...]` adds
ordering without weights. Running again skips finished stages (their `final/` exists) and resumes an
interrupted one from its checkpoints, since that is what the engine does for any run directory.
"""
from __future__ import annotations

from graphlib import CycleError, TopologicalSorter
from pathlib import Path

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..config import ConfigError, find_config, load_config


class PipelineStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["train", "rejection_sampling"] = Field("train", description="a training stage, or a data step")
    config: str
    init_from: str | None = None
    inputs: dict[str, str] = Field(default_factory=dict, description="config key -> stage whose run dir it gets")
    after: list[str] = Field(default_factory=list)
    overrides: list[str] = Field(default_factory=list)

    @property
    def needs(self) -> list[str]:
        return [*([self.init_from] if self.init_from else []), *self.inputs.values(), *self.after]


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    data_root: str = "data/demo"
    overrides: list[str] = Field(default_factory=list, description="applied to every stage")
    stages: dict[str, PipelineStage]


def load_pipeline(path: str | Path) -> PipelineConfig:
    return load_config(PipelineConfig, path)


def stage_order(pipeline: PipelineConfig, source: str) -> list[str]:
    """Stages in dependency order; a missing input or a cycle is rejected before anything runs."""
    graph = {}
    for name, st in pipeline.stages.items():
        missing = [d for d in st.needs if d not in pipeline.stages]
        if missing:
            raise ConfigError(f"{source}: stage '{name}' needs {missing}, which the pipeline does not define")
        graph[name] = set(st.needs)
    try:
        return list(TopologicalSorter(graph).static_order())
    except CycleError as e:
        raise ConfigError(f"{source}: the stages form a cycle: {' -> '.join(e.args[1])}") from None


def select(order: list[str], pipeline: PipelineConfig, only: list[str] | None, start: str | None) -> list[str]:
    """`--only S` runs just those stages; `--from S` runs S and every stage that depends on it, transitively."""
    for name in [*(only or []), *([start] if start else [])]:
        if name not in pipeline.stages:
            raise ConfigError(f"no stage named '{name}'; stages: {', '.join(order)}")
    if only:
        return [s for s in order if s in only]
    if start:
        chosen = {start}
        for s in order:
            if set(pipeline.stages[s].needs) & chosen:
                chosen.add(s)
        return [s for s in order if s in chosen]
    return order


def stage_overrides(pipeline: PipelineConfig, name: str, out: Path) -> list[str]:
    st = pipeline.stages[name]
    if st.kind == "rejection_sampling":  # its own config schema (configs/post/), not a stage config
        return [f"root={pipeline.data_root}", f"out_dir={out / name}", *st.overrides,
                *(f"{key}={out / stage}" for key, stage in st.inputs.items())]
    words = [f"data.root={pipeline.data_root}", f"run.out_dir={out / name}", *pipeline.overrides, *st.overrides]
    if st.init_from:
        words.append(f"init.from={out / st.init_from}")
    words += [f"{key}={out / stage}" for key, stage in st.inputs.items()]
    return words


def resolve_stage_config(pipeline: PipelineConfig, name: str, pipeline_path: Path) -> Path:
    folder = "post" if pipeline.stages[name].kind == "rejection_sampling" else "stages"
    return find_config(pipeline.stages[name].config, folder, pipeline_path.parent)

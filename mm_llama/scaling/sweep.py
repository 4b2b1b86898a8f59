"""`mm-llama scaling sweep`: an IsoFLOPs grid of small models trained through the engine.

For each budget C and model size N (non-embedding parameters, as the scaling-law literature counts),
the run trains D = C / (6·N) tokens; each finished run appends `{flops, name, params, tokens, loss}` to
`OUT/results.jsonl`. Re-running skips finished runs (the engine resumes interrupted ones).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..config import find_config, load_config
from ..config.stage import StageConfig


class SweepModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    overrides: list[str]


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    stage: str = Field(description="the stage config every run starts from")
    budgets: list[float] = Field(min_length=1)
    models: list[SweepModel] = Field(min_length=3)
    overrides: list[str] = Field(default_factory=list)
    min_steps: int = Field(10, gt=0, description="runs shorter than this are left out of the grid")
    warmup_fraction: float = Field(0.1, ge=0, le=1)


def non_embedding_params(cfg: StageConfig) -> int:
    lm = cfg.model.lm
    per_layer = lm.dim * lm.head_dim * (2 * lm.n_heads + 2 * lm.kv_heads) + 3 * lm.dim * lm.hidden_dim + 2 * lm.dim
    return lm.n_layers * per_layer + lm.dim


def plan(sweep: SweepConfig, sweep_path: Path, out: Path, extra: list[str]) -> list[tuple[dict, StageConfig]]:
    """Every (budget, model) run that is long enough, with its resolved stage config."""
    stage_path = find_config(sweep.stage, "stages", sweep_path.parent)
    runs = []
    for flops in sweep.budgets:
        for m in sweep.models:
            base = load_config(StageConfig, stage_path, [*sweep.overrides, *m.overrides, *extra])
            n = non_embedding_params(base)
            per_step = base.train.seq_len * base.train.micro_batch * base.train.grad_accum
            steps = math.ceil(flops / (6 * n * per_step))
            if steps < sweep.min_steps:
                continue
            warmup = int(steps * sweep.warmup_fraction)
            run_dir = out / f"C{flops:.2e}_{m.name}"
            cfg = load_config(StageConfig, stage_path, [
                *sweep.overrides, *m.overrides, *extra, f"train.steps={steps}", f"optim.warmup_steps={warmup}",
                f"run.out_dir={run_dir}", "train.ramp=[]", f"run.checkpoint_every={steps}",
            ])
            runs.append(({"flops": flops, "name": m.name, "params": n, "tokens": steps * per_step}, cfg))
    return runs


def run_sweep(sweep_path: Path, out: Path, extra: list[str]) -> Path:
    from ..train.engine import train_stage

    sweep = load_config(SweepConfig, sweep_path)
    runs = plan(sweep, sweep_path, out, extra)
    results = out / "results.jsonl"
    done = set()
    if results.exists():
        done = {(r["flops"], r["name"]) for r in map(json.loads, results.read_text().splitlines())}
    out.mkdir(parents=True, exist_ok=True)
    for info, cfg in runs:
        if (info["flops"], info["name"]) in done:
            continue
        print(f"== C={info['flops']:.2e} {info['name']}: N={info['params']:,} D={info['tokens']:,}", flush=True)
        run_dir = train_stage(cfg)
        summary = json.loads((Path(run_dir) / "final" / "summary.json").read_text())
        if "val_loss" not in summary:
            raise ValueError(f"{cfg.run.out_dir}: the stage has no held-out data (data.heldout), so no loss to fit")
        with open(results, "a") as fh:
            fh.write(json.dumps({**info, "loss": summary["val_loss"]}) + "\n")
    return results

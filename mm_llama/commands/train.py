"""`mm-llama train CONFIG [key=value ...]`: run one stage (resuming if its run directory has checkpoints)."""
from __future__ import annotations


def configure(p):
    p.add_argument("config", help="a stage config (configs/stages/...)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=50 run.out_dir=runs/x")


def run(args) -> int:
    from ..config import load_config
    from ..config.stage import StageConfig
    from ..train.engine import train_stage

    cfg = load_config(StageConfig, args.config, args.overrides)
    train_stage(cfg)
    return 0

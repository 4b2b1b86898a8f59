"""Shared set-up for engine tests: the demo data written once per test process, tiny stage configs."""
from __future__ import annotations

from pathlib import Path

from mm_llama.config import load_config
from mm_llama.config.stage import StageConfig

FAST = [  # a smaller model and batch than the demo, same code paths
    "model.lm.dim=64", "model.lm.n_layers=2", "model.lm.n_heads=4", "model.lm.n_kv_heads=2",
    "train.seq_len=64", "train.micro_batch=4", "train.ramp=[]", "train.eval_batches=2",
    "data.num_workers=0", "run.log_every=1000",
]


def stage(data_root: Path, out_dir: Path, *overrides: str, config="configs/stages/tiny/text_pretrain.yaml") -> StageConfig:
    return load_config(StageConfig, config, [*FAST, f"data.root={data_root}", f"run.out_dir={out_dir}", *overrides])


def stage_args(data_root: Path, out_dir: Path, *overrides: str) -> list[str]:
    """The same stage as command-line words for `mm-llama train`."""
    return ["configs/stages/tiny/text_pretrain.yaml", *FAST, f"data.root={data_root}", f"run.out_dir={out_dir}", *overrides]

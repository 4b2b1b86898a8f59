"""A stage config (DESIGN.md principle 3): which model, initialised from where, what trains, on what data, how long.

One engine runs every stage; a stage is this data, never a class.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..data.config import DataConfig
from .model import ModelConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunConfig(Strict):
    out_dir: str = "runs/stage"
    seed: int = 0
    checkpoint_every: int = Field(100, gt=0)
    keep_last: int = Field(3, gt=0, description="checkpoints kept on disk (older ones are deleted)")
    log_every: int = Field(1, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")


class InitConfig(Strict):
    """Where the weights start: random (`from_: null`), or a run dir / checkpoint / Meta / HF folder."""

    from_: str | None = Field(None, alias="from")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class RampPoint(Strict):
    """From `after_tokens` tokens seen on, use this sequence length and/or gradient accumulation."""

    after_tokens: int = Field(ge=0)
    seq_len: int | None = Field(None, gt=0)
    grad_accum: int | None = Field(None, gt=0)


class TrainConfig(Strict):
    objective: str = Field("lm", description="the task (mm_llama.train.tasks): lm, and those the modalities add")
    options: dict[str, Any] = Field(default_factory=dict, description="the task's own settings, validated by the task")
    steps: int = Field(gt=0)
    seq_len: int = Field(gt=0)
    micro_batch: int = Field(gt=0, description="sequences per forward pass on each rank")
    grad_accum: int = Field(1, gt=0)
    ramp: list[RampPoint] = Field(default_factory=list, description="batch-size / sequence-length ramp by tokens seen")
    clip_grad: float | None = Field(1.0, gt=0)
    trainable: list[str] = Field(default_factory=lambda: ["*"], description="fnmatch patterns of parameters that train")
    frozen: list[str] = Field(default_factory=list, description="patterns excluded from `trainable`")
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each Transformer block, and the text loss in a single "
                          "process")
    max_nonfinite_skips: int = Field(0, ge=0, description="steps with NaN/inf loss that may be skipped before stopping")
    eval_every: int = Field(0, ge=0, description="held-out loss every N steps (0: only at the end)")
    eval_batches: int = Field(4, ge=0)
    eval_untrained: bool = Field(False, description="also evaluate the starting weights before step 1: the final "
                                 "summary's `untrained_<metric>`, the baseline this stage's training must beat")
    polyak_last: int = Field(0, ge=0, description="average the last K checkpoints into the final model (annealing)")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        points = [p.after_tokens for p in self.ramp]
        if points != sorted(points):
            raise ValueError("train.ramp points must be in increasing after_tokens order")
        return self

    @property
    def longest_seq_len(self) -> int:
        """The longest rows the run reaches: `seq_len`, or a longer one of the ramp."""
        return max([self.seq_len] + [p.seq_len for p in self.ramp if p.seq_len])


class OptimConfig(Strict):
    name: Literal["adamw"] = "adamw"
    lr: float = Field(gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="floor of the cosine as a fraction of lr; linear decays to 0")


class ParallelConfig(Strict):
    """4D parallelism over a DeviceMesh in the paper's order [TP, CP, PP, DP], innermost first (SPEC §2.4).

    Under `torchrun` the product dp_shard·pp·cp·tp must equal WORLD_SIZE; a single process ignores it.
    """

    dp_shard: int = Field(-1, description="FSDP2 data-parallel degree; -1: all ranks left after tp, cp and pp")
    tp: int = Field(1, gt=0, description="tensor-parallel degree (attention heads and FFN columns split)")
    pp: int = Field(1, gt=0, description="pipeline stages (ranks); the first holds the embedding, the last the output")
    cp: int = Field(1, gt=0, description="context-parallel degree: the sequence split into 2·cp load-balanced chunks")
    pp_schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    pp_microbatches: int = Field(0, ge=0, description="pipeline micro-batches per forward (0: pp); must divide train.micro_batch")
    pp_virtual_stages: int = Field(2, gt=0, description="stages per rank for interleaved_1f1b")
    reshard_after_forward: bool = Field(False, description="FSDP2: free gathered weights after forward (the paper keeps them)")
    vocab_parallel_loss: bool = Field(True, description="with tp > 1: cross-entropy on vocabulary-sharded logits")
    timeout_s: float = Field(600.0, gt=0, description="a collective waiting longer than this fails the job, naming the rank")

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"parallel.dp_shard must be -1 or a positive degree, got {self.dp_shard}")
        return self


class StageConfig(Strict):
    name: str
    model: ModelConfig
    init: InitConfig = Field(default_factory=InitConfig)
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    run: RunConfig = Field(default_factory=RunConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _check(self) -> "StageConfig":
        longest = self.train.longest_seq_len
        if longest > self.model.lm.max_seq_len:
            raise ValueError(f"train.seq_len {longest} exceeds model.lm.max_seq_len {self.model.lm.max_seq_len}")
        if self.train.polyak_last > self.run.keep_last:
            raise ValueError(f"train.polyak_last ({self.train.polyak_last}) needs run.keep_last >= it ({self.run.keep_last})")
        return self

"""The one training engine: every stage is a `StageConfig` run through `train_stage`.

Per optimizer step: fetch `grad_accum` micro-batches, count their labelled tokens, run forward/backward on
each with the summed loss divided by the step's token count (so accumulation equals one large batch),
clip, set the scheduled learning rate, step, log one metrics row; checkpoint atomically every N steps.
A run directory that already holds checkpoints resumes from the newest one, data position and RNG included.

Under `torchrun` (WORLD_SIZE > 1) the same loop runs on every rank over a `parallel.ParallelRun`: the
model is sharded by the `parallel:` section (all four dimensions for `lm`; FSDP, TP and CP for the
per-token objectives, PP also for `vision_lm`; FSDP and TP for the rest), each data-parallel rank reads
its own share of the data (the
task's loader for that rank), losses and loss-unit counts are summed over ranks, checkpoints are
distributed (DCP), and only rank 0 writes metrics, plots and `final/` (one safetensors file, as a
single-process run writes it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from functools import partial
from pathlib import Path

import torch

from ..config import ConfigError, dump_config, read_yaml
from ..checkpoint.native import MODEL_SAFETENSORS, MODEL_YAML, atomic_folder, write_safetensors
from ..config.stage import StageConfig
from ..parallel import checkpoint as dcp_checkpoint
from . import checkpointing as ckpt
from .tasks import Task, task_for
from .metrics import MetricsLog, Progress
from .plots import plot_run
from .schedule import lr_at
from .trainable import select_trainable


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite and the configured number of skips is used up."""


def _device(cfg: StageConfig) -> torch.device:
    if cfg.run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.run.device)


def _autocast(cfg: StageConfig, device: torch.device):
    dtype = cfg.run.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _param_dtype(cfg: StageConfig, device: torch.device) -> torch.dtype:
    """The dtype FSDP computes in: bf16 parameters on GPU (reduced in fp32), fp32 on CPU."""
    dtype = cfg.run.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def _ramp(cfg: StageConfig, tokens: int) -> tuple[int, int]:
    """(seq_len, grad_accum) in force after `tokens` tokens (the paper's batch-size / length ramp)."""
    seq_len, accum = cfg.train.seq_len, cfg.train.grad_accum
    for point in cfg.train.ramp:
        if tokens >= point.after_tokens:
            seq_len = point.seq_len or seq_len
            accum = point.grad_accum or accum
    return seq_len, accum


def _one_kind(params: list) -> bool:
    """Whether fused AdamW can take `params` in one call: all plain tensors, or all DTensors of one mesh."""
    return len({getattr(p, "device_mesh", None) for p in params}) <= 1


def _optimizer(params, cfg: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only (frozen ones get no state); no decay on norms.

    The fused kernel needs one kind of tensor per group; a sharded composed model can mix DTensors
    (split blocks) with plain tensors or DTensors of another mesh (replicated parts), and then the
    per-parameter implementation runs instead."""
    params = list(params)
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda") and _one_kind(decay) and _one_kind(no_decay)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused, foreach=None if fused else False)


def _check_resume_config(run_dir: Path, cfg: StageConfig) -> None:
    """A resumed run must train the same thing: only `run.*`, `parallel.*` (the layout) and `train.steps` may change."""
    old = read_yaml(run_dir / "config.yaml")
    new = cfg.model_dump(mode="json", by_alias=True)
    changed = []
    for section in new:
        if section in ("run", "parallel"):
            continue
        a, b = old.get(section), new[section]
        if section == "train" and isinstance(a, dict):
            a, b = {**a, "steps": None}, {**b, "steps": None}
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            changed.append(section)
    if changed:
        raise ConfigError(f"{run_dir / 'config.yaml'}: the run being resumed used different {', '.join(changed)} "
                          "settings; use a new run.out_dir or restore the config")


def _per_block(cfg: StageConfig):
    """Activation checkpointing and compilation, applied to each Transformer block."""
    def apply(block: torch.nn.Module) -> None:
        if cfg.train.activation_checkpointing:
            from torch.distributed._composable import checkpoint as activation_checkpoint

            activation_checkpoint(block)
        if cfg.train.compile:
            block.compile()
    return apply


class _LocalRun:
    """The single-process layout, with the interface of `parallel.ParallelRun` the loop below uses."""

    rank, dp_rank, dp = 0, 0, 1

    def __init__(self, model: torch.nn.Module, device: torch.device, task: Task):
        self.model, self.device, self.state_module, self.task = model, device, model, task

    def parameters(self):
        return self.model.parameters()

    def forward_backward(self, b, n_labels: int, autocast) -> torch.Tensor:
        with autocast():
            loss = self.task.loss(self.model, b, self.device)
        (loss / max(n_labels, 1)).backward()
        return loss.detach().double().cpu()

    def sum_over_dp(self, value):
        return value

    def sum_losses(self, local: torch.Tensor) -> float:
        return float(local)

    def clip_grad_norm_(self, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], max_norm))

    def evaluate(self, batches, autocast) -> dict[str, float]:
        return self.task.evaluate(self.model, batches, self.device, autocast)

    def gather_data_states(self, state: dict) -> dict:
        return state


def _resume_data(loader, position, dp_rank: int, dp: int) -> None:
    """Put `loader` at a saved data position: one state, or one per data-parallel rank of the saved run."""
    if not isinstance(position, list):
        loader.load_state_dict(position)
    elif hasattr(loader, "load_state_dicts"):  # every data loader: continues, or re-splits for another DP size
        loader.load_state_dicts(position)
    elif len(position) == dp:
        loader.load_state_dict(position[dp_rank])
    else:
        raise ConfigError(f"the checkpoint holds the data positions of {len(position)} data-parallel ranks; this "
                          f"task's loader resumes on the same number only (now {dp})")


def train_stage(cfg: StageConfig) -> Path:
    """Run (or resume) one stage; returns its run directory. Under torchrun every rank calls it."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return _train_stage(cfg)
    from ..parallel import RankFailure, describe_failure

    try:
        return _train_stage(cfg)
    except (ConfigError, NonFiniteLossError):
        raise
    except Exception as e:  # a timed-out or broken collective: say which rank saw it and which ranks are stuck
        raise RankFailure(describe_failure(e)) from e


def _train_stage(cfg: StageConfig) -> Path:
    run_dir = Path(cfg.run.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    if (run_dir / "final" / "model.safetensors").exists():
        print(f"[{cfg.name}] already finished: {run_dir / 'final'}")
        return run_dir
    task = task_for(cfg)
    task.check()

    device = _device(cfg)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from ..parallel import start

        rank, dims = start(cfg, device)
    else:
        rank, dims = 0, None
    main = rank == 0
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    if main:
        ckpt.remove_partial(ckpt_dir)
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing:
        _check_resume_config(run_dir, cfg)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    model = task.build_model().to(device)
    select_trainable(model, cfg.train.trainable, cfg.train.frozen)
    autocast = _autocast(cfg, device)
    if distributed:
        from ..parallel import ParallelRun

        # what final/ holds (names, shapes, dtypes), known only before the model is sharded
        final_specs = {k: (v.shape, v.dtype) for k, v in ckpt.model_tensors(model).items()}
        setup = ParallelRun.setup if task.name == "lm" else partial(ParallelRun.setup_task, task=task)
        par = setup(model, cfg=cfg, dims=dims, device=device, dtype=_param_dtype(cfg, device), per_block=_per_block(cfg))
    else:
        for block in task.blocks(model):
            _per_block(cfg)(block)
        par = _LocalRun(model, device, task)
    optimizer = _optimizer(par.parameters(), cfg, device)

    state = {"step": 0, "tokens": 0, "data": None, "nonfinite_skips": 0}
    if existing:
        if distributed or dcp_checkpoint.is_distributed(existing[-1]):  # DCP loads at any layout
            state = dcp_checkpoint.load(existing[-1], par.state_module, optimizer)
        else:
            state = ckpt.load_checkpoint(existing[-1], model, optimizer)
        torch.set_rng_state(state["rng"])
    step, tokens = state["step"], state["tokens"]
    seq_len, accum = _ramp(cfg, tokens)

    def make_loader(seq_len: int, position):
        loader = task.loader(seq_len, cfg.train.micro_batch, par.dp_rank, par.dp)
        if position is not None:
            _resume_data(loader, position, par.dp_rank, par.dp)
        return loader, iter(loader)

    loader, batches = make_loader(seq_len, state["data"])
    heldout = task.heldout(seq_len, cfg.train.micro_batch)
    if heldout and cfg.train.eval_untrained and step == 0:
        _evaluate_untrained(run_dir, par, heldout, autocast, device, main)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step) if main else None
    progress = Progress(cfg.train.steps, step, cfg.run.log_every, cfg.name) if main else None
    nonfinite = state["nonfinite_skips"]
    model.train()
    try:
        while step < cfg.train.steps:
            new_seq_len, accum = _ramp(cfg, tokens)
            if new_seq_len != seq_len:
                seq_len = new_seq_len
                loader, batches = make_loader(seq_len, loader.state_dict())
                if main:
                    progress.note(f"sequence length -> {seq_len} at {tokens:,} tokens")
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            n_labels = int(par.sum_over_dp(sum(task.count(b) for b in micro)))
            loss_sum = torch.zeros((), dtype=torch.float64)
            for b in micro:
                loss_sum += par.forward_backward(b, n_labels, autocast)
            mean_loss = par.sum_losses(loss_sum) / max(n_labels, 1)
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if not math.isfinite(mean_loss):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                if nonfinite > cfg.train.max_nonfinite_skips:
                    raise NonFiniteLossError(f"[{cfg.name}] non-finite loss at step {step + 1} "
                                             f"(skips allowed: {cfg.train.max_nonfinite_skips})")
                if main:
                    progress.note(f"non-finite loss at step {step + 1}: step skipped ({nonfinite} so far)")
                grad_norm = float("nan")
            else:
                grad_norm = par.clip_grad_norm_(cfg.train.clip_grad if cfg.train.clip_grad is not None else float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = int(par.sum_over_dp(sum(task.batch_tokens(b) for b in micro)))
            tokens += step_tokens
            elapsed = time.perf_counter() - t0
            stats = loader.stats()
            row = {"step": step, "loss": mean_loss if math.isfinite(mean_loss) else None, "lr": lr, "tokens": tokens,
                   "tokens_per_s": step_tokens / elapsed, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                   **{k: stats[k] for k in ("skipped_samples", "skipped_shards", "packing_efficiency") if k in stats},
                   "seq_len": seq_len, "grad_accum": accum, "nonfinite_skips": nonfinite}
            if heldout and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps):
                row.update(_metrics(par.evaluate(heldout, autocast)))
            if main:
                metrics.write(row)
                progress.update({**row, "loss": mean_loss})
            if step % cfg.run.checkpoint_every == 0 or step == cfg.train.steps:
                trainer_state = {"step": step, "tokens": tokens, "data": par.gather_data_states(loader.state_dict()),
                                 "rng": torch.get_rng_state(), "nonfinite_skips": nonfinite}
                if distributed:
                    dcp_checkpoint.save(ckpt_dir / f"step_{step:08d}", par.state_module, optimizer, task.model_config(),
                                        trainer_state)
                else:
                    ckpt.save_checkpoint(ckpt_dir, step, model, task.model_config(), optimizer, trainer_state)
                if main:
                    ckpt.prune(ckpt_dir, cfg.run.keep_last)
                    plot_run(MetricsLog.read(run_dir / "metrics.jsonl"), run_dir / "plots" / "loss.png", cfg.name)
    finally:
        if main:
            progress.close()
            metrics.close()
    if distributed:
        _write_final_distributed(cfg, task, run_dir, par, heldout, autocast, final_specs)
    else:
        _write_final(cfg, task, run_dir, model, heldout, par, autocast)
    return run_dir


def _metrics(result) -> dict[str, float]:
    """Evaluation results as metrics-row entries (a bare float is the held-out loss)."""
    return result if isinstance(result, dict) else {"val_loss": result}



def _evaluate_untrained(run_dir: Path, par, heldout, autocast, device: torch.device, main: bool) -> None:
    """Held-out metrics of the weights the stage starts from, kept in `untrained.json` for the final summary."""
    # forked: evaluating must not move the random stream the training then draws from
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        result = _metrics(par.evaluate(heldout, autocast))
    if main:
        tmp = run_dir / "untrained.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(run_dir / "untrained.json")


def _untrained_metrics(run_dir: Path) -> dict[str, float]:
    path = run_dir / "untrained.json"
    return {f"untrained_{k}": v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def _write_final(cfg: StageConfig, task: Task, run_dir: Path, model, heldout, par, autocast) -> None:
    """The stage's output model in `final/`: the last checkpoint, or the Polyak average of the last K."""
    checkpoints = ckpt.list_checkpoints(run_dir / "checkpoints")
    summary = {"stage": cfg.name, "steps": cfg.train.steps}
    if cfg.train.polyak_last > 1 and len(checkpoints) >= 2:
        chosen = checkpoints[-cfg.train.polyak_last:]
        ckpt.load_weights(model, ckpt.polyak_average(chosen), str(run_dir / "checkpoints"))
        summary["polyak_averaged"] = [p.name for p in chosen]
    if heldout:
        summary.update(_metrics(par.evaluate(heldout, autocast)))
        summary.update(_untrained_metrics(run_dir))
    with atomic_folder(run_dir / "final") as tmp:
        ckpt.write_model(model, task.model_config(), tmp)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float))
    print(f"[{cfg.name}] finished: {run_dir / 'final'}" + (f" ({shown})" if shown else ""))


def _write_final_distributed(cfg: StageConfig, task: Task, run_dir: Path, par, heldout, autocast,
                             specs: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
    """`final/` from a torchrun run: every rank evaluates the final weights, rank 0 writes them as one safetensors
    file holding `specs` (the tensors, names and dtypes `_write_final` writes for the same model)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    checkpoints = ckpt.list_checkpoints(run_dir / "checkpoints")
    summary = {"stage": cfg.name, "steps": cfg.train.steps}
    if cfg.train.polyak_last > 1 and len(checkpoints) >= 2:
        chosen = checkpoints[-cfg.train.polyak_last:]
        states = [dcp_checkpoint.read_tensors(c, specs) for c in chosen]
        weights = {k: sum(s[k].double() for s in states).div(len(states)).to(states[0][k].dtype) for k in states[0]}
        set_model_state_dict(par.state_module, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        summary["polyak_averaged"] = [p.name for p in chosen]
    else:
        weights = None
    if heldout:
        summary.update(_metrics(par.evaluate(heldout, autocast)))
        summary.update(_untrained_metrics(run_dir))
    if par.rank == 0:
        if weights is None:
            weights = dcp_checkpoint.read_tensors(checkpoints[-1], specs)
        with atomic_folder(run_dir / "final") as tmp:
            write_safetensors(weights, tmp / MODEL_SAFETENSORS)
            (tmp / MODEL_YAML).write_text(dump_config(task.model_config()))
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if isinstance(v, float))
        print(f"[{cfg.name}] finished: {run_dir / 'final'}" + (f" ({shown})" if shown else ""))
    torch.distributed.barrier()

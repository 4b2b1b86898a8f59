"""The one training engine: every stage is a `StageConfig` run through `train_stage`.

Per optimizer step: fetch `grad_accum` micro-batches, count their labelled tokens, run forward/backward on
each with the summed loss divided by the step's token count (so accumulation equals one large batch),
clip, set the scheduled learning rate, step, log one metrics row; checkpoint atomically every N steps.
A run directory that already holds checkpoints resumes from the newest one, data position and RNG included.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from ..config import ConfigError, dump_config, read_yaml
from ..checkpoint.native import atomic_folder
from ..config.stage import StageConfig
from ..data import TextLoader, check_sources, heldout_batches
from ..model import Transformer, init_weights
from ..text import load_tokenizer
from . import checkpointing as ckpt
from .losses import lm_loss_sum
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


def _ramp(cfg: StageConfig, tokens: int) -> tuple[int, int]:
    """(seq_len, grad_accum) in force after `tokens` tokens (the paper's batch-size / length ramp)."""
    seq_len, accum = cfg.train.seq_len, cfg.train.grad_accum
    for point in cfg.train.ramp:
        if tokens >= point.after_tokens:
            seq_len = point.seq_len or seq_len
            accum = point.grad_accum or accum
    return seq_len, accum


def _optimizer(model: Transformer, cfg: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over trainable parameters only (frozen ones get no state); no decay on norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=device.type in ("cpu", "cuda"))


def _check_resume_config(run_dir: Path, cfg: StageConfig) -> None:
    """A resumed run must train the same thing: only `run.*` and `train.steps` may change."""
    old = read_yaml(run_dir / "config.yaml")
    new = cfg.model_dump(mode="json", by_alias=True)
    changed = []
    for section in new:
        if section == "run":
            continue
        a, b = old.get(section), new[section]
        if section == "train" and isinstance(a, dict):
            a, b = {**a, "steps": None}, {**b, "steps": None}
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            changed.append(section)
    if changed:
        raise ConfigError(f"{run_dir / 'config.yaml'}: the run being resumed used different {', '.join(changed)} "
                          "settings; use a new run.out_dir or restore the config")


def _init_model(cfg: StageConfig, device: torch.device) -> Transformer:
    model = Transformer(cfg.model.lm)
    if cfg.init.from_ is None:
        init_weights(model, torch.Generator().manual_seed(cfg.run.seed))
    else:
        from ..checkpoint import from_pretrained

        source = from_pretrained(cfg.init.from_)
        # compare what the weights mean, not how the FFN width was spelled (multiple_of vs multiplier)
        shape_keys = ["dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "vocab_size", "norm_eps", "rope_theta",
                      "use_scaled_rope", "rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                      "rope_original_context", "tie_embeddings"]
        diff = [k for k in shape_keys if getattr(source.args, k) != getattr(cfg.model.lm, k)]
        if diff:
            raise ConfigError(f"init.from {cfg.init.from_}: its model differs from model.lm in {diff}")
        model.load_state_dict(source.state_dict())
    return model.to(device)


def train_stage(cfg: StageConfig) -> Path:
    """Run (or resume) one stage; returns its run directory."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("distributed training (torchrun) is not built yet in this version: run single-process")
    run_dir = Path(cfg.run.out_dir)
    ckpt_dir = run_dir / "checkpoints"
    if (run_dir / "final" / "model.safetensors").exists():
        print(f"[{cfg.name}] already finished: {run_dir / 'final'}")
        return run_dir
    check_sources(cfg.data)
    tokenizer = load_tokenizer(Path(cfg.data.root) / cfg.data.tokenizer)
    if tokenizer.n_words > cfg.model.lm.vocab_size:
        raise ConfigError(f"model.lm.vocab_size ({cfg.model.lm.vocab_size}) is smaller than the tokenizer's "
                          f"{tokenizer.n_words} tokens ({Path(cfg.data.root) / cfg.data.tokenizer})")

    device = _device(cfg)
    torch.manual_seed(cfg.run.seed)
    random.seed(cfg.run.seed)
    ckpt.remove_partial(ckpt_dir)
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing:
        _check_resume_config(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))

    model = _init_model(cfg, device)
    select_trainable(model, cfg.train.trainable, cfg.train.frozen)
    if cfg.train.activation_checkpointing:
        from torch.distributed._composable import checkpoint as activation_checkpoint

        for layer in model.layers:
            activation_checkpoint(layer)
    if cfg.train.compile:
        for layer in model.layers:
            layer.compile()
    optimizer = _optimizer(model, cfg, device)
    autocast = _autocast(cfg, device)

    state = {"step": 0, "tokens": 0, "data": None, "nonfinite_skips": 0}
    if existing:
        state = ckpt.load_checkpoint(existing[-1], model, optimizer)
        torch.set_rng_state(state["rng"])
    step, tokens = state["step"], state["tokens"]
    seq_len, accum = _ramp(cfg, tokens)

    def make_loader(seq_len: int, position):
        loader = TextLoader(cfg.data, tokenizer, seq_len=seq_len, batch_size=cfg.train.micro_batch, seed=cfg.run.seed)
        if position is not None:
            loader.load_state_dict(position)
        return loader, iter(loader)

    loader, batches = make_loader(seq_len, state["data"])
    heldout = (heldout_batches(cfg.data, tokenizer, seq_len, cfg.train.micro_batch, cfg.train.eval_batches)
               if cfg.data.heldout and cfg.train.eval_batches else [])
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step)
    progress = Progress(cfg.train.steps, step, cfg.run.log_every, cfg.name)
    nonfinite = state["nonfinite_skips"]
    model.train()
    try:
        while step < cfg.train.steps:
            new_seq_len, accum = _ramp(cfg, tokens)
            if new_seq_len != seq_len:
                seq_len = new_seq_len
                loader, batches = make_loader(seq_len, loader.state_dict())
                progress.note(f"sequence length -> {seq_len} at {tokens:,} tokens")
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            n_labels = sum(int((b.labels != -100).sum()) for b in micro)
            loss_sum = torch.zeros((), dtype=torch.float64)
            for b in micro:
                with autocast():
                    logits = model(b.tokens.to(device), doc_ids=b.doc_ids.to(device))
                    loss = lm_loss_sum(logits, b.labels.to(device))
                (loss / max(n_labels, 1)).backward()
                loss_sum += loss.detach().double().cpu()
            mean_loss = float(loss_sum) / max(n_labels, 1)
            lr = lr_at(step, cfg.optim, cfg.train.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if not math.isfinite(mean_loss):
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                if nonfinite > cfg.train.max_nonfinite_skips:
                    raise NonFiniteLossError(f"[{cfg.name}] non-finite loss at step {step + 1} "
                                             f"(skips allowed: {cfg.train.max_nonfinite_skips})")
                progress.note(f"non-finite loss at step {step + 1}: step skipped ({nonfinite} so far)")
                grad_norm = float("nan")
            else:
                trainable = [p for p in model.parameters() if p.grad is not None]
                max_norm = cfg.train.clip_grad if cfg.train.clip_grad is not None else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            step_tokens = sum(b.tokens.numel() for b in micro)
            tokens += step_tokens
            elapsed = time.perf_counter() - t0
            stats = loader.stats()
            row = {"step": step, "loss": mean_loss if math.isfinite(mean_loss) else None, "lr": lr, "tokens": tokens,
                   "tokens_per_s": step_tokens / elapsed, "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                   "skipped_samples": stats["skipped_samples"], "skipped_shards": stats["skipped_shards"],
                   "packing_efficiency": stats["packing_efficiency"], "seq_len": seq_len, "grad_accum": accum,
                   "nonfinite_skips": nonfinite}
            if heldout and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == cfg.train.steps):
                row["val_loss"] = evaluate(model, heldout, device, autocast)
            metrics.write(row)
            progress.update({**row, "loss": mean_loss})
            if step % cfg.run.checkpoint_every == 0 or step == cfg.train.steps:
                trainer_state = {"step": step, "tokens": tokens, "data": loader.state_dict(),
                                 "rng": torch.get_rng_state(), "nonfinite_skips": nonfinite}
                ckpt.save_checkpoint(ckpt_dir, step, model, cfg.model, optimizer, trainer_state)
                ckpt.prune(ckpt_dir, cfg.run.keep_last)
                plot_run(MetricsLog.read(run_dir / "metrics.jsonl"), run_dir / "plots" / "loss.png", cfg.name)
    finally:
        progress.close()
        metrics.close()
    _write_final(cfg, run_dir, model, heldout, device, autocast)
    return run_dir


@torch.no_grad()
def evaluate(model: Transformer, batches, device: torch.device, autocast) -> float:
    """Mean next-token loss per labelled token over fixed held-out batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        with autocast():
            logits = model(b.tokens.to(device), doc_ids=b.doc_ids.to(device))
            total += float(lm_loss_sum(logits, b.labels.to(device)))
        count += int((b.labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _write_final(cfg: StageConfig, run_dir: Path, model: Transformer, heldout, device, autocast) -> None:
    """The stage's output model in `final/`: the last checkpoint, or the Polyak average of the last K."""
    checkpoints = ckpt.list_checkpoints(run_dir / "checkpoints")
    summary = {"stage": cfg.name, "steps": cfg.train.steps}
    if cfg.train.polyak_last > 1 and len(checkpoints) >= 2:
        chosen = checkpoints[-cfg.train.polyak_last:]
        model.load_state_dict(ckpt.polyak_average(chosen), strict=not cfg.model.lm.tie_embeddings)
        summary["polyak_averaged"] = [p.name for p in chosen]
    if heldout:
        summary["val_loss"] = evaluate(model, heldout, device, autocast)
    with atomic_folder(run_dir / "final") as tmp:
        ckpt.write_model(model, cfg.model, tmp)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"[{cfg.name}] finished: {run_dir / 'final'}" + (f" (held-out loss {summary['val_loss']:.4f})" if heldout else ""))

"""`mm-llama params CONFIG`: parameter counts computed on the meta device; `--plan` adds per-GPU memory for a layout.

`mm-llama params configs/models/llama3_1_405b.yaml --plan --tp 8 --pp 16 --dp 64 --seq-len 8192 --batch-per-dp 32`
prints parameters, gradients, optimizer state and activations per GPU (see `parallel.memory`).
"""
from __future__ import annotations

import json

from ..config import ModelConfig, load_config


def configure(p):
    p.add_argument("config", help="a model config (configs/models/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    plan = p.add_argument_group("memory plan (--plan)")
    plan.add_argument("--plan", action="store_true", help="per-GPU memory for the parallel layout below")
    for name, default in (("tp", 1), ("cp", 1), ("pp", 1), ("dp", 1), ("seq-len", 8192), ("batch-per-dp", 1), ("micro-batch", 1)):
        plan.add_argument(f"--{name}", type=int, default=default)
    plan.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, to say whether the plan fits")


def run(args) -> int:
    from ..model.params import build_meta, component_table, count, parameter_table, speech_components

    config = load_config(ModelConfig, args.config, args.overrides)
    model = build_meta(config)
    lm_model = model.lm if config.vision is not None else model
    rows = parameter_table(lm_model)
    components = component_table(model) if config.vision is not None else [("lm", count(model))]
    total = count(model)
    if config.speech is not None:
        extra = speech_components(config)
        components += extra
        total += sum(n for _, n in extra)
    lm = config.lm
    non_embedding = count(lm_model) - lm.vocab_size * lm.dim * (1 if lm.tie_embeddings else 2)
    memory = _plan(lm, args) if args.plan else None
    if args.json:
        print(json.dumps({"name": config.name, "total": total, "non_embedding": non_embedding, "parts": dict(rows),
                          "components": dict(components), **({"plan_gib": memory} if memory else {})}))
        return 0
    width = max(len(r[0]) for r in rows) + 2
    if len(components) > 1:
        print(f"{config.name}: components")
        for part, n in components:
            print(f"  {part:<{width}}{n:>18,}")
    print(f"{config.name}: language model")
    for part, n in rows:
        print(f"  {part:<{width}}{n:>18,}")
    print(f"  {'total':<{width}}{total:>18,}")
    print(f"  {'lm non-embedding':<{width}}{non_embedding:>18,}")
    if memory is not None:
        _print_plan(memory, args, width)
    return 0


def _plan(lm, args) -> dict:
    """Per-GPU GiB of the language model at the layout given on the command line (`parallel.memory`)."""
    from ..config import ConfigError
    from ..parallel.memory import plan

    try:
        return plan(lm, tp=args.tp, cp=args.cp, pp=args.pp, dp=args.dp, seq_len=args.seq_len,
                    batch_per_dp=args.batch_per_dp, micro_batch=args.micro_batch).as_gib()
    except ValueError as e:
        raise ConfigError(f"--plan: {e}") from None


def _print_plan(memory: dict, args, width: int) -> None:
    print(f"per-GPU memory, TP={args.tp} CP={args.cp} PP={args.pp} DP={args.dp}, seq {args.seq_len}, "
          f"{args.batch_per_dp} sequences per DP rank (fullest pipeline stage: {memory['stage']}):")
    for key in ("parameters", "master", "gradients", "optimizer", "activations", "total"):
        print(f"  {key:<{width}}{memory[key]:>14.2f} GiB")
    print(f"  {'fits ' + format(args.gpu_gib, 'g') + ' GiB':<{width}}{'yes' if memory['total'] <= args.gpu_gib else 'NO':>18}")

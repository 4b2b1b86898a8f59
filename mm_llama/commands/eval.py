"""`mm-llama eval CKPT --task ...`: held-out metrics of a checkpoint, as a table or one flat JSON object.

`perplexity` reads any text checkpoint. The other tasks evaluate a stage's run directory with that stage's own
held-out data and the same code that reports its metrics during training (the task's `heldout` and `evaluate`),
so `eval` and the stage's `summary.json` agree; each needs a run of the objective that produces it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

# task → (objective of the run it reads, what it reports)
TASKS = {
    "perplexity": (None, "held-out loss and perplexity on text shards, with the unigram baseline"),
    "image_qa": ("vision_lm", "image question accuracy per question type, with chance and majority-answer baselines"),
    "caption": ("vision_lm", "caption attribute accuracy (exact caption answer), with baselines"),
    "video_qa": ("video_lm", "video question accuracy per type (motion, colour, shape), with baselines"),
    "asr": ("speech_lm", "ASR word error rate on held-out utterances"),
    "preference": ("reward_model", "reward-model accuracy on held-out rankings (all pairs; chosen vs rejected)"),
}


def configure(p):
    p.add_argument("checkpoint", help="a run directory, native checkpoint, Meta or Hugging Face folder")
    p.add_argument("--task", required=True, choices=sorted(TASKS), action="append",
                   help="; ".join(f"{k}: {v}" for k, (_, v) in TASKS.items()))
    p.add_argument("--config", help="stage config whose data.heldout and tokenizer to use (default: the run's config.yaml)")
    p.add_argument("--data-root", help="override data.root of that config")
    p.add_argument("--seq-len", type=int, default=256, help="perplexity: tokens per row")
    p.add_argument("--batches", type=int, help="held-out batches (default: 16 of 4 rows for perplexity, the "
                                               "stage's train.eval_batches otherwise)")
    p.add_argument("--json", action="store_true", help="print one flat JSON object {metric: value}")


def run(args) -> int:
    from ..config import ConfigError, load_config
    from ..config.stage import StageConfig

    config = Path(args.config) if args.config else Path(args.checkpoint) / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{config}: no stage config to take held-out data from; pass --config")
    overrides = [f"data.root={args.data_root}"] if args.data_root else []
    metrics: dict[str, float] = {}
    for task in dict.fromkeys(args.task):  # in the order asked, once each
        objective = TASKS[task][0]
        if objective is None:
            metrics.update(_perplexity(args, load_config(StageConfig, config, overrides)))
            continue
        batches = [f"train.eval_batches={args.batches}"] if args.batches else []
        cfg = load_config(StageConfig, config, [*overrides, *batches])
        if cfg.train.objective != objective:
            raise ConfigError(f"eval --task {task} needs a run of objective '{objective}'; {config} is a "
                              f"'{cfg.train.objective}' stage")
        metrics.update(_stage_metrics(task, args.checkpoint, cfg))
    if args.json:
        print(json.dumps(metrics))
    else:
        _print_table(metrics)
    return 0


def _perplexity(args, cfg) -> dict[str, float]:
    from ..checkpoint import from_pretrained
    from ..evaluate.text import text_metrics
    from ..text import load_tokenizer

    model = from_pretrained(args.checkpoint)
    return text_metrics(model, cfg.data, load_tokenizer(cfg.data.tokenizer_path),
                        seq_len=min(args.seq_len, model.args.max_seq_len), max_batches=args.batches or 16)


def _stage_metrics(task: str, checkpoint: str, cfg) -> dict[str, float]:
    """The stage task's own held-out evaluation of the checkpoint, keyed `<task>.<metric>`."""
    import torch

    from ..config import ConfigError
    from ..train.tasks import task_for

    stage = task_for(cfg)
    if task == "preference":
        from ..model.reward import load_reward_model

        model = load_reward_model(checkpoint)[0]
    else:
        from ..infer.loading import load_model

        model = load_model(checkpoint)[0]
    batches = stage.heldout(cfg.train.seq_len, cfg.train.micro_batch)
    if not batches:
        raise ConfigError(f"eval --task {task}: the stage config has no data.heldout (or train.eval_batches is 0)")
    found = stage.evaluate(model, batches, torch.device("cpu"), contextlib.nullcontext)
    if task == "image_qa":
        found = {k: v for k, v in found.items() if "caption" not in k}
    elif task == "caption":
        found = {k: v for k, v in found.items() if "caption" in k or k == "val_loss"}
    return {f"{task}.{k}": v for k, v in found.items()}


def _print_table(metrics: dict[str, float]) -> None:
    """Model figures with their baseline beside them (`X_baseline`, or `_majority_`/`_chance_` rows of a type)."""
    shown = {k: v for k, v in metrics.items() if not k.endswith("_baseline") and "_majority_" not in k
             and "_chance_" not in k}
    width = max(len(k) for k in shown) + 2
    print(f"{'metric':<{width}}{'model':>10}{'baseline':>10}  baseline is")
    for key, value in shown.items():
        base, what = metrics.get(key + "_baseline"), "unigram" if key + "_baseline" in metrics else ""
        if base is None and "_acc_" in key:
            base, what = metrics.get(key.replace("_acc_", "_majority_")), "majority answer"
        cell = f"{base:>10.4f}" if base is not None else f"{'':>10}"
        print(f"{key:<{width}}{value:>10.4f}{cell}  {what}")

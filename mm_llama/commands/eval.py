"""`mm-llama eval CKPT --task ...`: held-out metrics of a checkpoint, as a table or one flat JSON object."""
from __future__ import annotations

import json
from pathlib import Path

TASKS = {"perplexity": "held-out loss and perplexity on text shards, with the unigram baseline"}
LATER = {"image_qa", "video_qa", "caption", "asr", "preference"}


def configure(p):
    p.add_argument("checkpoint", help="a run directory, native checkpoint, Meta or Hugging Face folder")
    p.add_argument("--task", required=True, choices=sorted([*TASKS, *LATER]), action="append",
                   help="; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    p.add_argument("--config", help="stage config whose data.heldout and tokenizer to use (default: the run's config.yaml)")
    p.add_argument("--data-root", help="override data.root of that config")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batches", type=int, default=16, help="held-out batches of 4 rows")
    p.add_argument("--json", action="store_true", help="print one flat JSON object {metric: value}")


def run(args) -> int:
    from ..checkpoint import from_pretrained
    from ..config import ConfigError, load_config
    from ..config.stage import StageConfig
    from ..evaluate.text import text_metrics
    from ..text import load_tokenizer

    later = sorted(set(args.task) & LATER)
    if later:
        raise ConfigError(f"eval task(s) {later} are not built yet in this version; available: {sorted(TASKS)}")
    config = Path(args.config) if args.config else Path(args.checkpoint) / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{config}: no stage config to take held-out data from; pass --config")
    cfg = load_config(StageConfig, config, [f"data.root={args.data_root}"] if args.data_root else [])
    model = from_pretrained(args.checkpoint)
    metrics = text_metrics(model, cfg.data, load_tokenizer(cfg.data.tokenizer_path),
                           seq_len=min(args.seq_len, model.args.max_seq_len), max_batches=args.batches)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(f"{'metric':<16}{'model':>12}{'baseline':>12}")
        for key in ("heldout_loss", "heldout_ppl"):
            print(f"{key:<16}{metrics[key]:>12.4f}{metrics[key + '_baseline']:>12.4f}")
    return 0

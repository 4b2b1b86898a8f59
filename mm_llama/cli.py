"""`mm-llama`: the command line (DESIGN.md, public surface).

Each command lives in `mm_llama/commands/<name>.py` with `configure(parser)` and `run(args) -> int`;
a command whose module does not exist yet says so and exits non-zero.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": "run one stage; dotted key=value overrides; distributed under torchrun",
    "pipeline": "run a stage graph in dependency order, resuming",
    "validate": "resolve and check a config without running it",
    "params": "parameter counts: total, per component, trainable (meta device)",
    "data": "write the demo data set (`data demo OUT`) or pack your files into shards (`data pack`)",
    "tokenizer": "train a BPE tokenizer in Llama 3's tiktoken file format",
    "convert": "convert checkpoints between native, Hugging Face and Meta layouts",
    "chat": "terminal chat; attach images, audio, video by path",
    "serve": "OpenAI-compatible /v1/chat/completions plus a web chat page",
    "eval": "perplexity, caption/VQA accuracy, ASR word error rate, ...",
    "scaling": "IsoFLOPs sweep, fit and prediction",
}


def _module(name: str):
    try:
        return importlib.import_module(f"mm_llama.commands.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"mm_llama.commands.{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-llama", description="Compositional Llama 3 training: text, vision, video, speech.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = _module(name)
        if module is not None:
            module.configure(p)
        else:
            p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    # key=value overrides may also follow options (`pipeline CFG --out D k=v`): argparse alone stops at the option
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command is None:
        parser.print_help()
        return 2
    module = _module(args.command)
    if module is None:
        print(f"mm-llama {args.command}: not built yet in this version of mm_llama.", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mm-llama {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

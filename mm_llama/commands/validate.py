"""`mm-llama validate CONFIG [key=value ...]`: resolve and check a config without running anything."""
from __future__ import annotations


def kind_of(data: dict) -> str:
    if "train" in data:
        return "stage"
    if "lm" in data:
        return "model"
    return "unknown"


def configure(p):
    p.add_argument("config", help="a model or stage config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--quiet", action="store_true", help="print only the verdict")


def run(args) -> int:
    from ..config import ConfigError, ModelConfig, apply_overrides, dump_config, read_yaml, validate
    from ..config.stage import StageConfig

    data = apply_overrides(read_yaml(args.config), args.overrides, args.config)
    kind = kind_of(data)
    if kind == "unknown":
        raise ConfigError(f"{args.config}: neither a stage config (needs 'train') nor a model config (needs 'lm')")
    cfg = validate(StageConfig if kind == "stage" else ModelConfig, data, args.config)
    if kind == "stage":
        from ..data import check_sources

        check_sources(cfg.data)
    if not args.quiet:
        print(dump_config(cfg), end="")
    print(f"{args.config}: valid {kind} config")
    return 0

"""`mm-llama params CONFIG`: parameter counts computed on the meta device."""
from __future__ import annotations

import json

from ..config import ModelConfig, load_config


def configure(p):
    p.add_argument("config", help="a model config (configs/models/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from ..model.params import build_meta, component_table, count, parameter_table

    config = load_config(ModelConfig, args.config, args.overrides)
    model = build_meta(config)
    lm_model = model.lm if config.vision is not None else model
    rows = parameter_table(lm_model)
    components = component_table(model) if config.vision is not None else [("lm", count(model))]
    total = count(model)
    lm = config.lm
    non_embedding = count(lm_model) - lm.vocab_size * lm.dim * (1 if lm.tie_embeddings else 2)
    if args.json:
        print(json.dumps({"name": config.name, "total": total, "non_embedding": non_embedding, "parts": dict(rows),
                          "components": dict(components)}))
        return 0
    width = max(len(r[0]) for r in rows) + 2
    if config.vision is not None:
        print(f"{config.name}: components")
        for part, n in components:
            print(f"  {part:<{width}}{n:>18,}")
    print(f"{config.name}: language model")
    for part, n in rows:
        print(f"  {part:<{width}}{n:>18,}")
    print(f"  {'total':<{width}}{total:>18,}")
    print(f"  {'lm non-embedding':<{width}}{non_embedding:>18,}")
    return 0

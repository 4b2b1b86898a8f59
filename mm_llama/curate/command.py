"""`mm-llama data curate CONFIG [key=value ...]`: the entry the `data` command dispatches to."""
from __future__ import annotations

import json
import logging

from ..config import load_config
from .config import CurateConfig


def configure(p):
    p.add_argument("config", help="a curation config (configs/curate/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. output=curated/ workers=8")
    p.add_argument("--json", action="store_true", help="print the whole report as one JSON object")


def run(args) -> int:
    from .runner import curate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_config(CurateConfig, args.config, args.overrides)
    report = curate(config)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    print(f"{config.name}: {report['documents_in']} in, {report['documents_out']} out → {config.output}")
    for rule, n in sorted(report["removed"].items(), key=lambda kv: -kv[1]):
        print(f"  removed {n:>10,}  {rule}")
    if "lines_removed" in report:
        print(f"  lines removed {report['lines_removed']:,}")
    if report.get("domains"):
        print("  domains: " + ", ".join(f"{d} {n:,}" for d, n in sorted(report["domains"].items())))
    print(f"  details: {config.output}/report.json and {config.output}/reports/")
    return 0

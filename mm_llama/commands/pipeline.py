"""`mm-llama pipeline CONFIG [--out DIR] [--only S ...] [--from S]`: run a stage graph, resuming."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path


def configure(p):
    p.add_argument("config", help="a pipeline config (configs/pipelines/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every stage")
    p.add_argument("--out", help="folder for the stages' run directories (default runs/<pipeline name>)")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and everything after it")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation and report")


def run(args) -> int:
    from ..config import load_config
    from ..config.stage import StageConfig
    from ..pipeline import load_pipeline, select, stage_order, stage_overrides
    from ..pipeline.graph import resolve_stage_config
    from ..pipeline.report import collect, write_report
    from ..train.engine import train_stage

    path = Path(args.config)
    pipeline = load_pipeline(path)
    for word in args.overrides:  # a data.root override moves the whole pipeline's data, data steps included
        if word.startswith("data.root="):
            pipeline.data_root = word.split("=", 1)[1]
    order = stage_order(pipeline, str(path))
    chosen = select(order, pipeline, args.only, args.start)
    out = Path(args.out or f"runs/{pipeline.name}")
    from ..post.rejection_sampling import RejectionSamplingConfig, run_rejection_sampling

    # resolve and validate every chosen stage before running any
    configs = {}
    for s in chosen:
        rejection = pipeline.stages[s].kind == "rejection_sampling"
        extra = [] if rejection else args.overrides  # stage overrides do not apply to a data step's schema
        configs[s] = load_config(RejectionSamplingConfig if rejection else StageConfig,
                                 resolve_stage_config(pipeline, s, path), [*stage_overrides(pipeline, s, out), *extra])
    for s in chosen:
        print(f"== stage {s} ({pipeline.stages[s].config}) -> {out / s}", flush=True)
        start = _clock()
        if pipeline.stages[s].kind == "rejection_sampling":
            run_rejection_sampling(configs[s])
        else:
            train_stage(configs[s])
        _record_time(out, s, start)
    if args.no_eval:
        return 0
    metrics = collect(out, order)
    if not metrics:
        print("no stage has finished yet: no evaluation written")
        return 0
    write_report(out, pipeline.name, order, metrics)
    print(f"wrote {out / 'eval.json'} and {out / 'summary.md'}")
    return 0


def _clock() -> tuple[float, float]:
    """(wall s, CPU s of this process and its finished children: the data-loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _record_time(out: Path, stage: str, start: tuple[float, float]) -> None:
    """Adds this invocation's time for `stage` to `out/timings.json` (a resumed stage sums its runs)."""
    wall, cpu = (now - then for now, then in zip(_clock(), start))
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    before = timings.get(stage, {"wall_s": 0.0, "cpu_s": 0.0})
    timings[stage] = {"wall_s": round(before["wall_s"] + wall, 1), "cpu_s": round(before["cpu_s"] + cpu, 1)}
    path.write_text(json.dumps(timings, indent=2) + "\n")

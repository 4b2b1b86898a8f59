"""`mm-llama scaling {sweep,fit,predict}`: IsoFLOPs sweep, the paper's fits, compute-optimal predictions."""
from __future__ import annotations

import json
from pathlib import Path


def configure(p):
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser("sweep", help="train an IsoFLOPs grid of small models (budgets and sizes from a config)")
    s.add_argument("config", help="a sweep config (configs/scaling/*.yaml)")
    s.add_argument("overrides", nargs="*", help="key=value overrides for every run's stage config")
    s.add_argument("--out", required=True, help="folder for the runs and results.jsonl")
    f = sub.add_parser("fit", help="fit parabolas per budget and D* = A·C^α; plot the IsoFLOP curves")
    f.add_argument("results", help="results.jsonl from a sweep (rows with flops, tokens, loss)")
    f.add_argument("--out", help="folder for fit.json and isoflops.png (default: beside the results)")
    f.add_argument("--downstream", help="JSONL rows {flops, nll, accuracy, compute_optimal} for the two-stage forecast")
    f.add_argument("--flops", type=float, help="also forecast the downstream accuracy at this budget")
    q = sub.add_parser("predict", help="compute-optimal tokens and model size for a budget")
    q.add_argument("--flops", type=float, required=True)
    q.add_argument("--fit", help="fit.json from `scaling fit` (default: the paper's constants, α=0.537, A=0.299)")


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
    return rows


def run(args) -> int:
    from ..scaling.laws import PAPER_A, PAPER_ALPHA, PowerLaw, fit_downstream, fit_power_law, isoflop_minima

    if args.action == "sweep":
        from ..scaling.sweep import run_sweep

        results = run_sweep(Path(args.config), Path(args.out), args.overrides)
        print(f"wrote {results}")
        return 0
    if args.action == "predict":
        law = PowerLaw(PAPER_ALPHA, PAPER_A)
        if args.fit:
            fit = json.loads(Path(args.fit).read_text())
            law = PowerLaw(fit["alpha"], fit["A"])
        print(f"compute {args.flops:.3e} FLOPs: {law.tokens(args.flops):.4g} tokens, "
              f"{law.params(args.flops):.4g} parameters (alpha={law.alpha}, A={law.A})")
        return 0
    from ..scaling.plots import plot_isoflops

    path = Path(args.results)
    runs = _rows(path)
    minima = isoflop_minima(runs)
    law = fit_power_law(minima)
    out = Path(args.out) if args.out else path.parent
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'budget (FLOPs)':>16}{'optimal tokens':>18}{'min loss':>10}")
    for m in minima:
        print(f"{m.flops:>16.3e}{m.tokens:>18.4g}{m.loss:>10.4f}")
    print(f"D*(C) = {law.A:.4g} · C^{law.alpha:.4f}")
    fit = {"alpha": law.alpha, "A": law.A, "minima": [m.__dict__ for m in minima]}
    if args.downstream:
        rows = _rows(Path(args.downstream))
        opt = [r for r in rows if r.get("compute_optimal", True)]
        forecast = fit_downstream([r["flops"] for r in opt], [r["nll"] for r in opt],
                                  [r["nll"] for r in rows], [r["accuracy"] for r in rows])
        fit["downstream"] = forecast.__dict__
        if args.flops:
            print(f"forecast at {args.flops:.3e} FLOPs: nll {float(forecast.nll(args.flops)):.4f}, "
                  f"accuracy {float(forecast.accuracy(args.flops)):.4f}")
    (out / "fit.json").write_text(json.dumps(fit, indent=2, default=list))
    plot_isoflops(runs, minima, law, out / "isoflops.png")
    print(f"wrote {out / 'fit.json'} and {out / 'isoflops.png'}")
    return 0

"""Scaling laws: the fits recover known constants; the paper's constants give its compute-optimal point."""
import json

import numpy as np
import pytest

from mm_llama.cli import main
from mm_llama.scaling.laws import PAPER_A, PAPER_ALPHA, PowerLaw, fit_downstream, fit_power_law, isoflop_minima


def synthetic_runs(alpha, A, budgets, noise=0.0, seed=0):
    """IsoFLOP curves whose minima lie exactly on D* = A·C^α: loss = L(C) + k·(log10 D − log10 D*)²."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        d_opt = A * c ** alpha
        floor = 2.0 + 50 * c ** -0.05
        for offset in np.linspace(-0.8, 0.8, 7):
            d = d_opt * 10 ** offset
            runs.append({"flops": c, "tokens": d, "loss": floor + 0.3 * offset ** 2 + noise * rng.standard_normal()})
    return runs


def test_fit_recovers_alpha_and_A():
    runs = synthetic_runs(0.52, 0.4, [1e18, 1e19, 1e20, 1e21])
    law = fit_power_law(isoflop_minima(runs))
    assert law.alpha == pytest.approx(0.52, abs=1e-6)
    assert law.A == pytest.approx(0.4, rel=1e-4)


def test_fit_is_robust_to_noise():
    law = fit_power_law(isoflop_minima(synthetic_runs(0.537, 0.299, np.logspace(18, 22, 6), noise=0.003, seed=3)))
    assert law.alpha == pytest.approx(0.537, abs=0.02)


def test_paper_constants_give_its_compute_optimal_point():
    law = PowerLaw(PAPER_ALPHA, PAPER_A)
    # SPEC §2.2: "402B parameters on 16.55T tokens" for 3.8e25 FLOPs (the legend's constants give ~16.3T)
    assert law.tokens(3.8e25) == pytest.approx(16.55e12, rel=0.02)
    assert law.params(3.8e25) == pytest.approx(402e9, rel=0.05)


def test_non_convex_budget_is_an_error():
    runs = [{"flops": 1e18, "tokens": t, "loss": l} for t, l in [(1e9, 1.0), (1e10, 2.0), (1e11, 2.5)]]
    with pytest.raises(ValueError, match="not convex"):
        isoflop_minima(runs + [{"flops": 1e18, "tokens": 1e12, "loss": 2.6}])
    with pytest.raises(ValueError, match="needs at least 3"):
        isoflop_minima(runs[:2])


def test_two_stage_downstream_forecast():
    flops = np.logspace(18, 22, 8)
    nll = 2.0 - 0.25 * np.log10(flops / 1e18)
    acc = 0.25 + 0.7 / (1 + np.exp(6.0 * (nll - 1.4)))
    forecast = fit_downstream(flops, nll, nll, acc)
    assert forecast.slope == pytest.approx(-0.25, abs=1e-6)
    assert float(forecast.accuracy(1e24)) == pytest.approx(0.25 + 0.7 / (1 + np.exp(6.0 * (0.5 - 1.4))), abs=1e-3)


def test_fit_and_predict_commands(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in synthetic_runs(0.5, 1.0, [1e15, 1e16, 1e17])))
    assert main(["scaling", "fit", str(results)]) == 0
    out = capsys.readouterr().out
    assert "C^0.5000" in out
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["alpha"] == pytest.approx(0.5) and (tmp_path / "isoflops.png").stat().st_size > 5000
    assert main(["scaling", "predict", "--flops", "1e20", "--fit", str(tmp_path / "fit.json")]) == 0
    assert "1e+10 tokens" in capsys.readouterr().out
    assert main(["scaling", "predict", "--flops", "3.8e25"]) == 0
    assert "1.629e+13 tokens" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    assert main(["scaling", "fit", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:1: not JSON" in capsys.readouterr().err


def test_sweep_trains_a_small_grid_through_the_engine(demo_data, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""
name: t
stage: {(__import__('pathlib').Path('configs/stages/tiny/text_pretrain.yaml')).resolve()}
budgets: [4.0e8]
overrides: [train.seq_len=32, train.micro_batch=2, train.eval_batches=1, data.num_workers=0, run.log_every=1000,
            "data.root={demo_data}"]
models:
  - {{name: a, overrides: [model.lm.dim=16, model.lm.n_heads=2, model.lm.n_kv_heads=1, model.lm.n_layers=1]}}
  - {{name: b, overrides: [model.lm.dim=32, model.lm.n_heads=2, model.lm.n_kv_heads=1, model.lm.n_layers=1]}}
  - {{name: c, overrides: [model.lm.dim=32, model.lm.n_heads=2, model.lm.n_kv_heads=1, model.lm.n_layers=2]}}
min_steps: 2
""")
    assert main(["scaling", "sweep", str(sweep), "--out", str(tmp_path / "out")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["a", "b", "c"]
    for r in rows:  # C = 6·N·D within one step's tokens
        assert 6 * r["params"] * r["tokens"] == pytest.approx(4.0e8, rel=0.1)
        assert r["loss"] > 0
    assert main(["scaling", "sweep", str(sweep), "--out", str(tmp_path / "out")]) == 0  # finished runs are skipped
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 3

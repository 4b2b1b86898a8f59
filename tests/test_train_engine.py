"""The training engine on tiny text stages: schedules, accumulation, freezing, NaN, Polyak, bad configs."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import stage
from mm_llama.config import ConfigError
from mm_llama.config.stage import OptimConfig
from mm_llama.train.tasks import text_lm
from mm_llama.train.engine import NonFiniteLossError, train_stage
from mm_llama.train.schedule import lr_at


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedules():
    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cos, 110) == pytest.approx(0.1)
    assert lr_at(9, cos, 110) == pytest.approx(1.0)
    assert lr_at(60, cos, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, cos, 110) == pytest.approx(0.1)
    lin = OptimConfig(lr=2.0, schedule="linear")
    assert [lr_at(s, lin, 4) for s in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])


def test_run_directory_contents(demo_data, tmp_path):
    cfg = stage(demo_data, tmp_path / "run", "train.steps=6", "run.checkpoint_every=3", "train.eval_every=3")
    run_dir = train_stage(cfg)
    got = rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    for key in ["step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "skipped_samples", "packing_efficiency"]:
        assert all(key in r for r in got), key
    assert got[-1]["tokens"] == 6 * 4 * 64
    assert "val_loss" in got[2] and "val_loss" in got[5] and "val_loss" not in got[0]
    assert (run_dir / "config.yaml").exists() and (run_dir / "plots" / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert (run_dir / "final" / "model.safetensors").exists()
    # a finished stage is not run again
    assert train_stage(cfg) == run_dir and len(rows(run_dir)) == 6


def test_untrained_evaluation_is_recorded_and_leaves_training_unchanged(demo_data, tmp_path):
    plain = train_stage(stage(demo_data, tmp_path / "plain", "train.steps=4"))
    with_base = train_stage(stage(demo_data, tmp_path / "base", "train.steps=4", "train.eval_untrained=true"))
    assert [r["loss"] for r in rows(plain)] == [r["loss"] for r in rows(with_base)]
    summary = json.loads((with_base / "final" / "summary.json").read_text())
    assert "untrained_val_loss" not in json.loads((plain / "final" / "summary.json").read_text())
    # a random init predicts about uniformly over the vocabulary; four steps already do better
    assert summary["untrained_val_loss"] == pytest.approx(math.log(4352), abs=0.5)
    assert summary["val_loss"] < summary["untrained_val_loss"]
    # a resumed run keeps the first evaluation
    shutil.rmtree(with_base / "final")
    summary_again = json.loads((train_stage(stage(demo_data, tmp_path / "base", "train.steps=4",
                                                  "train.eval_untrained=true")) / "final" / "summary.json").read_text())
    assert summary_again["untrained_val_loss"] == summary["untrained_val_loss"]


def test_gradient_accumulation_equals_one_large_batch(demo_data, tmp_path):
    big = train_stage(stage(demo_data, tmp_path / "big", "train.steps=3", "train.micro_batch=8"))
    acc = train_stage(stage(demo_data, tmp_path / "acc", "train.steps=3", "train.micro_batch=4", "train.grad_accum=2"))
    for a, b in zip(rows(big), rows(acc)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["tokens"] == b["tokens"]


@pytest.mark.slow  # compiling the blocks and the loss takes about a minute on this CPU
def test_compiled_stage_gives_the_eager_losses(demo_data, tmp_path):
    eager = train_stage(stage(demo_data, tmp_path / "eager", "train.steps=3"))
    compiled = train_stage(stage(demo_data, tmp_path / "compiled", "train.steps=3", "train.compile=true"))
    for a, b in zip(rows(eager), rows(compiled)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(demo_data, tmp_path):
    cfg = stage(demo_data, tmp_path / "run", "train.steps=2", "train.frozen=[tok_embeddings.*,layers.0.*]")
    run_dir = train_stage(cfg)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    from mm_llama.model import Transformer, init_weights

    n_trainable = sum(1 for n, _ in Transformer(cfg.model.lm).named_parameters()
                      if not n.startswith(("tok_embeddings", "layers.0.")))
    assert len(optim["state"]) == n_trainable
    start = init_weights(Transformer(cfg.model.lm), torch.Generator().manual_seed(cfg.run.seed)).state_dict()
    final = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(final["tok_embeddings.weight"], start["tok_embeddings.weight"])
    assert torch.equal(final["layers.0.attention.wq.weight"], start["layers.0.attention.wq.weight"])
    assert not torch.equal(final["layers.1.attention.wq.weight"], start["layers.1.attention.wq.weight"])


def test_pattern_matching_nothing_is_an_error(demo_data, tmp_path):
    with pytest.raises(ValueError, match="'vision.*' matches no parameter"):
        train_stage(stage(demo_data, tmp_path / "run", "train.steps=1", "train.trainable=[vision.*]"))


def _nan_at(step_to_fail):
    calls = {"n": 0}
    real = text_lm.lm_loss_sum

    def loss(logits, labels):
        calls["n"] += 1
        out = real(logits, labels)
        return out * float("nan") if calls["n"] == step_to_fail else out

    return loss


def test_nonfinite_loss_stops_naming_the_step(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(text_lm, "lm_loss_sum", _nan_at(3))
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        train_stage(stage(demo_data, tmp_path / "run", "train.steps=5"))


def test_nonfinite_loss_skips_a_bounded_number(demo_data, tmp_path, monkeypatch):
    monkeypatch.setattr(text_lm, "lm_loss_sum", _nan_at(2))
    run_dir = train_stage(stage(demo_data, tmp_path / "run", "train.steps=4", "train.max_nonfinite_skips=1"))
    got = rows(run_dir)
    assert got[1]["loss"] is None and got[1]["nonfinite_skips"] == 1
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(got) if i != 1)


def test_polyak_average_of_last_checkpoints(demo_data, tmp_path):
    cfg = stage(demo_data, tmp_path / "run", "train.steps=6", "run.checkpoint_every=2", "run.keep_last=3",
                "train.polyak_last=3", "optim.schedule=linear")
    run_dir = train_stage(cfg)
    parts = [load_file(str(run_dir / "checkpoints" / f"step_{s:08d}" / "model.safetensors")) for s in (2, 4, 6)]
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    for key in ["layers.1.feed_forward.w2.weight", "norm.weight"]:
        torch.testing.assert_close(final[key], sum(p[key] for p in parts) / 3)
    assert json.loads((run_dir / "final" / "summary.json").read_text())["polyak_averaged"] == [
        "step_00000002", "step_00000004", "step_00000006"]


def test_init_from_a_previous_stage(demo_data, tmp_path):
    first = train_stage(stage(demo_data, tmp_path / "a", "train.steps=2"))
    second = stage(demo_data, tmp_path / "b", "train.steps=1", f"init.from={first}", "optim.lr=1e-12", "optim.warmup_steps=0")
    run_dir = train_stage(second)
    a = load_file(str(first / "final" / "model.safetensors"))
    b = load_file(str(run_dir / "final" / "model.safetensors"))
    torch.testing.assert_close(a["layers.0.attention.wq.weight"], b["layers.0.attention.wq.weight"])


def test_missing_data_fails_before_training_naming_the_path(demo_data, tmp_path):
    cfg = stage(demo_data, tmp_path / "run", "train.steps=1", "data.sources=[{name: x, shards: nowhere/shard-*.tar}]")
    with pytest.raises(ConfigError, match="nowhere/shard-"):
        train_stage(cfg)
    assert not (tmp_path / "run").exists()


def test_vocab_smaller_than_tokenizer_is_rejected(demo_data, tmp_path):
    with pytest.raises(ConfigError, match="vocab_size \\(100\\) is smaller than the tokenizer"):
        train_stage(stage(demo_data, tmp_path / "run", "train.steps=1", "model.lm.vocab_size=100"))


def test_resuming_with_a_different_model_is_refused(demo_data, tmp_path):
    train_stage(stage(demo_data, tmp_path / "run", "train.steps=2", "run.checkpoint_every=1", "train.polyak_last=0"))
    import shutil

    shutil.rmtree(tmp_path / "run" / "final")
    with pytest.raises(ConfigError, match="different model"):
        train_stage(stage(demo_data, tmp_path / "run", "train.steps=4", "model.lm.n_layers=3"))


def test_impossible_stage_values(demo_data, tmp_path):
    with pytest.raises(ConfigError, match="exceeds model.lm.max_seq_len"):
        stage(demo_data, tmp_path, "train.seq_len=4096")
    with pytest.raises(ConfigError, match="unknown key 'train.stpes'; did you mean 'steps'"):
        stage(demo_data, tmp_path, "train.stpes=3")


def test_eval_command_reports_model_and_baseline(demo_data, tmp_path, capsys):
    from mm_llama.cli import main

    run_dir = train_stage(stage(demo_data, tmp_path / "run", "train.steps=60", "train.micro_batch=16", "optim.lr=5e-3", "optim.warmup_steps=5"))
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--task", "perplexity", "--json", "--batches", "4", "--seq-len", "64"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"heldout_loss", "heldout_loss_baseline", "heldout_ppl", "heldout_ppl_baseline"}
    assert metrics["heldout_loss"] < metrics["heldout_loss_baseline"]
    assert main(["eval", str(run_dir), "--task", "asr"]) == 1  # a text run holds no speech model
    assert "eval --task asr needs a run of objective 'speech_lm'" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--task", "perplexity"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["metric", "model", "baseline"] and table[1].startswith("heldout_loss")


def test_unknown_objective_names_the_known_ones(demo_data, tmp_path):
    with pytest.raises(ValueError, match="train.objective 'nope' has no task; known: .*'lm'"):
        train_stage(stage(demo_data, tmp_path / "run", "train.steps=1", "train.objective=nope"))

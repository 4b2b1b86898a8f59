"""Pipeline parallelism (parallel.pp=2, CPU, gloo, 2 processes) of the preference objectives on the text LM: the
reward model and DPO (its frozen reference cut into the same stages, run forward-only before each policy step)
reproduce the single-process run: losses, gradient norms and every held-out metric per step, those of the starting
weights (`train.eval_untrained`, a forward-only first pass) and the weights after two optimizer steps; one process
resumes the pipelined checkpoint to the single run's third step. Slow (4 processes): dp=2 × pp=2 equals one process
fed the global batch. Without a process group: each micro-batch's pair loss (`pipeline_loss`) sums to the task's
loss of the whole batch, DPO's rankings are laid out three rows each, and the layouts left out are refused.

The batches hold 4 rankings (2 per micro-batch), so a micro-batch's pairs index rows that do not start at 0."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import test_parallel_multimodal as multimodal
from mm_llama.config import ConfigError, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.parallel import ParallelDims, ParallelRun
from mm_llama.parallel.pipeline import PipelineShape, RewardStage
from mm_llama.train.engine import train_stage
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.dpo import RESPONSES_PER_RANKING, slot_rankings
from test_parallel_multimodal import (COMMON, LM, VISION, first_two_steps_agree, pipelined_runs, rows,
                                      single_process_runs, torchrun)

root, lm_dir = multimodal.root, multimodal.lm_dir  # the demo dialog shards and a saved random LM (fixtures)

PP = "parallel.pp=2"
CASES = {
    "reward_model": ("reward_model", [*LM, "init.from={lm}", "train.seq_len=128", "train.micro_batch=4"]),
    "dpo": ("dpo", [*LM, "init.from={lm}", "train.seq_len=96", "train.micro_batch=4"]),
}
# Both losses reach few weights: the reward's the response ends, DPO's the output rows of the responses' tokens. The
# pipeline pads rows to train.seq_len (the attention sums in another order) and computes DPO's logits at every
# position, so a weight whose gradient is near AdamW's eps moves by a part of the learning rate on fp32 noise in
# that gradient (lr 1e-2, eps 1e-8: a few weights in 10^5 differed by up to 3e-4 after two steps, while every loss and
# gradient norm agreed to 1e-7). Hence eps 1e-6, lr 1e-3 and a tolerance of 1e-4 on the weights and held-out
# metrics; a wrong gradient moves thousands of weights apart by about the learning rate.
# The held-out evaluation also runs on the starting weights (`train.eval_untrained`): the pipeline's first pass is
# then a forward-only one.
COMMON_PP = ["train.eval_every=1", "optim.lr=1e-3", "optim.eps=1e-6", "optim.warmup_steps=0",
             "optim.schedule=constant", "train.eval_batches=2", "train.eval_untrained=true"]
TOL = 1e-4
RUNS = {**{name: (name, [PP]) for name in CASES},
        "dpo_interleaved": ("dpo", [PP, "parallel.pp_schedule=interleaved_1f1b"])}


def stage(name, root, lm_dir, out, *extra) -> StageConfig:
    config, overrides = CASES[name]
    overrides = [o.replace("{lm}", str(lm_dir)) for o in overrides]
    return load_config(StageConfig, f"configs/stages/tiny/{config}.yaml",
                       [*COMMON, *COMMON_PP, *overrides, f"data.root={root}", f"run.out_dir={out}", *extra])


@pytest.fixture(scope="module")
def pp_runs(root, lm_dir, tmp_path_factory):
    return pipelined_runs(stage, RUNS, root, lm_dir, tmp_path_factory.mktemp("pp_pref"))


@pytest.fixture(scope="module")
def single_runs(root, lm_dir, tmp_path_factory):
    return single_process_runs(stage, CASES, root, lm_dir, tmp_path_factory.mktemp("single_pref"))


@pytest.mark.parametrize("run_name", list(RUNS))
def test_a_pipelined_preference_run_reproduces_the_single_process_run(run_name, pp_runs, single_runs):
    name = RUNS[run_name][0]
    run, ref = pp_runs / run_name, single_runs[name]
    got, want = first_two_steps_agree(run, ref)
    held_out = sorted(k for k in want[0] if k.startswith("val_"))
    assert "val_loss" in held_out and len(held_out) == 5  # every metric of the task's own evaluation
    for k in held_out:
        assert [r[k] for r in got] == pytest.approx([r[k] for r in want], rel=TOL, abs=TOL), k
    untrained, expected_untrained = (json.loads((d / "untrained.json").read_text()) for d in (run, ref))
    assert untrained.keys() == expected_untrained.keys() and len(untrained) == 5
    assert untrained == pytest.approx(expected_untrained, rel=1e-5, abs=1e-5)
    final = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(ref / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=TOL, rtol=TOL, msg=k)
    third = load_file(str(ref / "final" / "model.safetensors"))
    assert [k for k in expected if (expected[k] - third[k]).abs().max() > 5e-4]  # the weights do move


@pytest.mark.parametrize("name", list(CASES))
def test_a_pipelined_preference_checkpoint_resumes_in_one_process(name, pp_runs, single_runs, root, lm_dir,
                                                                   tmp_path):
    ref = single_runs[name]
    whole = load_file(str(ref / "final" / "model.safetensors")).keys()
    saved = FileSystemReader(str(pp_runs / name / "checkpoints" / "step_00000002")).read_metadata()
    assert {k.removeprefix("model.") for k in saved.state_dict_metadata if k.startswith("model.")} == set(whole)
    run = tmp_path / name
    shutil.copytree(pp_runs / name, run)
    shutil.rmtree(run / "final")
    train_stage(stage(name, root, lm_dir, run, "train.steps=3"))
    got, want = rows(run), rows(ref)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[2]["loss"] == pytest.approx(want[2]["loss"], abs=1e-5)
    final, expected = (load_file(str(d / "final" / "model.safetensors")) for d in (run, ref))
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=TOL, rtol=TOL, msg=k)


def _task_and_batch(name, root, lm_dir, tmp_path):
    cfg = stage(name, root, lm_dir, tmp_path)
    task = task_for(cfg)
    return task, next(iter(task.loader(cfg.train.seq_len, 4, 0, 1)))


def test_the_micro_batch_losses_of_the_reward_model_sum_to_the_whole_batch_loss(root, lm_dir, tmp_path):
    """The rows padded as the pipeline pads them (a padded position sees itself, rows repeated) and cut in micro-batches
    of 2 and 1 rows: their pair losses add up to the task's loss; the real rows' rewards are the unpadded ones."""
    task, batch = _task_and_batch("reward_model", root, lm_dir, tmp_path)
    model = task.build_model()
    want = task.loss(model, batch, "cpu")
    shape = PipelineShape(seq_len=batch.tokens.shape[1] + 5, rows=6, pad_id=0)
    (tokens,), row_ids, (mask, positions) = RewardStage.step_inputs(batch, shape, "cpu")
    assert tokens.shape == (6, shape.seq_len) and mask.shape == (6, 1, shape.seq_len, shape.seq_len)
    assert mask[:, 0].diagonal(dim1=1, dim2=2).all()
    logits = model(tokens, mask=mask, positions=positions)
    n, t = batch.tokens.shape
    torch.testing.assert_close(logits[:n, :t], model(batch.tokens, mask=batch.mask, positions=batch.positions))
    for size in (2, 1):
        got = sum(task.pipeline_loss(logits[r], r, batch) for r in row_ids.split(size))
        torch.testing.assert_close(got, want)


def test_dpo_rankings_take_three_rows_each_and_their_micro_batch_losses_sum_to_the_whole_batch_loss(
        root, lm_dir, tmp_path):
    task, batch = _task_and_batch("dpo", root, lm_dir, tmp_path)
    model, ref = task.build_model(), task.build_model()
    with torch.no_grad():
        for p in model.parameters():  # the policy moved away from the reference, so the DPO term is not ln 2
            p.add_(0.01 * torch.randn_like(p))
    want = task.terms(model, batch, "cpu", reference_model=ref)["loss"].sum()
    slotted = slot_rankings(batch, 5, pad_id=0)
    rows_ = 5 * RESPONSES_PER_RANKING
    assert slotted.tokens.shape == (rows_, batch.tokens.shape[1])
    firsts = batch.best.unique()
    assert slotted.best.unique().tolist() == [RESPONSES_PER_RANKING * k for k in range(len(firsts))]
    for old, new in zip(batch.better.tolist(), slotted.better.tolist()):
        assert torch.equal(slotted.labels[new], batch.labels[old]) and torch.equal(slotted.tokens[new], batch.tokens[old])
        assert new // RESPONSES_PER_RANKING == slotted.best[slotted.better == new][0] // RESPONSES_PER_RANKING
    assert (slotted.labels[RESPONSES_PER_RANKING * len(firsts):] == -100).all()
    with torch.no_grad():
        slotted.reference = task.reference_logps(slotted, "cpu", reference_model=ref)
    logits = model(slotted.tokens)
    row_ids = torch.arange(rows_)
    for rankings in (1, 5):  # micro-batches of whole rankings
        got = sum(task.pipeline_loss(logits[r], r, slotted) for r in row_ids.split(rankings * RESPONSES_PER_RANKING))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        slot_rankings(batch, len(firsts) - 1, pad_id=0)


@pytest.mark.parametrize("name,overrides,refused", [
    ("reward_model", [*VISION, "init.from=null"], "'reward_model' with a model.vision section: parallel.pp cuts the "
     "text reward model only"),
    ("dpo", [*VISION, "init.from={lm}"], "'dpo' with a model.vision or model.speech section: parallel.pp cuts the "
     "text DPO only"),
    ("dpo", [*LM, "init.from={lm}", "parallel.cp=2"], "'dpo': parallel.pp > 1 together with parallel.cp"),
])
def test_preference_layouts_a_pipeline_cannot_use_are_refused(name, overrides, refused, root, lm_dir):
    cfg = load_config(StageConfig, f"configs/stages/tiny/{name}.yaml",
                      [o.replace("{lm}", str(lm_dir)) for o in overrides] + [f"data.root={root}", PP])
    task = task_for(cfg)
    model = task.build_model()
    with pytest.raises(ConfigError, match=refused):
        ParallelRun.setup_task(model, task, cfg, ParallelDims(dp=1, pp=2, cp=cfg.parallel.cp, tp=cfg.parallel.tp),
                               torch.device("cpu"), torch.float32, lambda block: None)


@pytest.mark.slow  # 4 processes
def test_data_and_pipeline_parallel_preference_runs_equal_the_single_process_global_batch(root, lm_dir, tmp_path):
    """dp=2 × pp=2: each data-parallel replica is a pipeline (DPO's reference cut alike and sharded by FSDP over DP);
    the run equals one process fed both replicas' batches (accumulated)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(multimodal, "DP", 4)  # the launch's process count
    try:
        torchrun([stage(name, root, lm_dir, tmp_path / "pp" / name, PP, "parallel.dp_shard=2") for name in CASES],
                 tmp_path)
    finally:
        mp.undo()
    for name in CASES:
        ref = multimodal.single_global_batch(stage(name, root, lm_dir, tmp_path / "single" / name))
        got, want = rows(tmp_path / "pp" / name), rows(ref)
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
        assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-4)
        for k in (k for k in want[0] if k.startswith("val_")):
            assert [r[k] for r in got] == pytest.approx([r[k] for r in want], rel=TOL, abs=TOL), k
        final = load_file(str(tmp_path / "pp" / name / "final" / "model.safetensors"))
        expected = load_file(str(ref / "final" / "model.safetensors"))
        for k in expected:
            torch.testing.assert_close(final[k], expected[k], atol=TOL, rtol=TOL, msg=k)

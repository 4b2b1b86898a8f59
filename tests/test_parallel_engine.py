"""The engine under torchrun on CPU with gloo: every layout reproduces the single-process losses of the same
global batch (within 1e-5), checkpoints reload at another layout, a hung rank fails with its rank named,
and a two-node launch over loopback works unchanged."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import stage, stage_args
from mm_llama.data.loader import Batch, TextLoader, summarize
from mm_llama.parallel import checkpoint as dcp_checkpoint
from mm_llama.train.tasks import text_lm
from mm_llama.train.engine import train_stage

STEPS = ["train.steps=3", "train.seq_len=32", "run.checkpoint_every=2", "run.keep_last=3"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n, data_root, out, *overrides, nnodes=1, timeout=300, launcher_args=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), *launcher_args]
    if nnodes == 1:
        cmd += ["--master_port", str(_port())]
    cmd += ["-m", "mm_llama", "train", *stage_args(data_root, out, *STEPS, *overrides)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check(result):
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def single(demo_data, tmp_path_factory):
    """The single-process run every layout without data parallelism must reproduce."""
    return train_stage(stage(demo_data, tmp_path_factory.mktemp("single") / "run", *STEPS))


class GlobalBatchLoader:
    """What `dp` data-parallel ranks read together, as one loader: their batches' rows side by side."""

    dp = 2

    def __init__(self, cfg, tokenizer, seq_len, batch_size, seed, rank=0, world_size=1):
        self.parts = [TextLoader(cfg, tokenizer, seq_len, batch_size // self.dp, seed, r, self.dp) for r in range(self.dp)]

    def __iter__(self):
        for parts in zip(*self.parts):
            yield Batch(*(torch.cat([getattr(b, k) for b in parts]) for k in ("tokens", "labels", "doc_ids")))

    def state_dict(self):
        return [p.state_dict() for p in self.parts]

    def stats(self):
        return summarize([])


@pytest.fixture(scope="module")
def single_dp2(demo_data, tmp_path_factory):
    """The single-process run fed the global batch of two data-parallel ranks."""
    mp = pytest.MonkeyPatch()
    mp.setattr(text_lm, "TextLoader", GlobalBatchLoader)
    try:
        return train_stage(stage(demo_data, tmp_path_factory.mktemp("single_dp2") / "run", *STEPS))
    finally:
        mp.undo()


@pytest.mark.parametrize("layout", [
    pytest.param(["parallel.tp=2"], id="tp"),
    pytest.param(["parallel.cp=2"], id="cp"),
    pytest.param(["parallel.pp=2", "parallel.pp_microbatches=2"], id="pp-1f1b"),
    pytest.param(["parallel.pp=2", "parallel.pp_microbatches=2", "parallel.pp_schedule=interleaved_1f1b"],
                 id="pp-interleaved", marks=pytest.mark.slow),
])
def test_model_parallel_layouts_match_single_process(demo_data, tmp_path, single, layout):
    run = tmp_path / "run"
    check(torchrun(2, demo_data, run, *layout))
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)
    val = json.loads((run / "final" / "summary.json").read_text())["val_loss"]
    assert val == pytest.approx(json.loads((single / "final" / "summary.json").read_text())["val_loss"], abs=1e-5)
    final, ref = load_file(str(run / "final" / "model.safetensors")), load_file(str(single / "final" / "model.safetensors"))
    assert final.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], atol=1e-5, rtol=1e-4)


def test_pipeline_follows_a_sequence_length_ramp(demo_data, tmp_path):
    """The pipeline's buffers keep one shape: rows are padded to the ramp's longest length from the first step."""
    ramp = "train.ramp=[{after_tokens: 128, seq_len: 64}]"
    single = train_stage(stage(demo_data, tmp_path / "single", *STEPS, ramp))
    assert [json.loads(r)["seq_len"] for r in (single / "metrics.jsonl").read_text().splitlines()] == [32, 64, 64]
    run = tmp_path / "run"
    check(torchrun(2, demo_data, run, ramp, "parallel.pp=2", "parallel.pp_microbatches=2"))
    assert losses(run) == pytest.approx(losses(single), abs=1e-5)


def test_fsdp_data_parallel_matches_the_same_global_batch(demo_data, tmp_path, single_dp2):
    run = tmp_path / "run"
    check(torchrun(2, demo_data, run, "train.micro_batch=2"))
    assert losses(run) == pytest.approx(losses(single_dp2), abs=1e-5)
    assert [json.loads(x)["tokens"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [128, 256, 384]


@pytest.mark.slow  # four processes on the CI's two cores
def test_fsdp_with_tensor_parallel_2d(demo_data, tmp_path, single_dp2):
    run = tmp_path / "run"
    check(torchrun(4, demo_data, run, "train.micro_batch=2", "parallel.tp=2"))
    assert losses(run) == pytest.approx(losses(single_dp2), abs=1e-5)


def test_checkpoint_loads_at_another_layout_and_single_process(demo_data, tmp_path, single):
    """TP=2 stops after 2 steps; PP=2 (and, separately, one process) continues to the single run's losses."""
    first = tmp_path / "tp"
    check(torchrun(2, demo_data, first, "parallel.tp=2", "train.steps=2"))
    ckpt = first / "checkpoints" / "step_00000002"
    assert dcp_checkpoint.is_distributed(ckpt)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    (first / "final" / "model.safetensors").unlink()  # make it resumable
    shutil.rmtree(first / "final")
    check(torchrun(2, demo_data, first, "parallel.pp=2"))
    assert losses(first) == pytest.approx(losses(single), abs=1e-5)
    # one process resumes the same distributed checkpoint
    shutil.rmtree(copy / "final")
    train_stage(stage(demo_data, copy, *STEPS))
    assert losses(copy) == pytest.approx(losses(single), abs=1e-5)
    # and the model part converts to one safetensors file and back
    cfg = stage(demo_data, copy, *STEPS)
    out = dcp_checkpoint.to_safetensors(ckpt, cfg.model, tmp_path / "conv" / "model.safetensors")
    weights = load_file(str(out))
    back = dcp_checkpoint.from_safetensors(out, tmp_path / "dcp_again")
    again = dcp_checkpoint.read_model(back, cfg.model)
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


HANG = ("import sys, time, torch, os; torch.set_num_threads(1)\n"
        "from mm_llama.data import loader\n"
        "if os.environ['RANK'] == '1':\n"
        "    loader.TextLoader.__iter__ = lambda self: iter([time.sleep(3600)])\n"
        "from mm_llama.cli import main; sys.exit(main(sys.argv[1:]))\n")


def test_a_hung_rank_fails_the_job_with_the_rank_named(demo_data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "--no-python", sys.executable, "-c", HANG, "train",
           *stage_args(demo_data, tmp_path / "run", *STEPS, "train.micro_batch=2", "parallel.timeout_s=5")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "rank 0 of 2 failed" in result.stderr and "timed out" in result.stderr.lower()
    assert "ranks 1 failed to pass monitoredbarrier" in result.stderr.lower()  # the hung rank, named


@pytest.mark.slow  # two launchers and a rendezvous
def test_two_nodes_over_loopback(demo_data, tmp_path, single_dp2):
    port = _port()
    rdzv = ["--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "loopback"]
    run = tmp_path / "run"
    cmd = lambda node: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", *rdzv, "--node_rank",
                        str(node), "-m", "mm_llama", "train", *stage_args(demo_data, run, *STEPS, "train.micro_batch=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for n in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert losses(run) == pytest.approx(losses(single_dp2), abs=1e-5)

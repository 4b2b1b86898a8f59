"""Every objective besides 'lm' under torchrun (CPU, gloo, 2 processes): FSDP data parallelism reproduces the
single-process run fed the same global batch (within 1e-5), a DP run resumes from its distributed checkpoint (and
in one process, its data positions re-split),
`final/` is the single-process file, frozen parts carry no optimizer state, and tensor parallelism of the
cross-attention, ViT and Conformer blocks reproduces the single-process losses.

One torchrun launch trains every stage of a layout in turn (the driver below), so the process start-up
is paid once per layout, not once per objective."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from mm_llama.config import ModelConfig, dump_config, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.train.engine import train_stage
from mm_llama.train.tasks import TASKS, task_for
from test_parallel_engine import _port

DP = 2
DRIVER = ("import shutil, sys, torch; torch.set_num_threads(1)\n"
          "import torch.distributed as dist\n"
          "from mm_llama.config import load_config\n"
          "from mm_llama.config.stage import StageConfig\n"
          "from mm_llama.train.engine import train_stage\n"
          "dist.init_process_group('gloo')\n"
          "for arg in sys.argv[1:]:\n"
          "    if arg.startswith('unfinish='):  # drop final/ so that the next stage resumes the run\n"
          "        if dist.get_rank() == 0:\n"
          "            shutil.rmtree(arg.split('=', 1)[1])\n"
          "        dist.barrier()\n"
          "    else:\n"
          "        train_stage(load_config(StageConfig, arg))\n")

LM = ["model.lm.dim=64", "model.lm.n_layers=2", "model.lm.n_heads=4", "model.lm.n_kv_heads=2"]
COMMON = ["data.num_workers=0", "train.steps=2", "run.checkpoint_every=2", "train.eval_every=0",
          "train.eval_batches=1", "run.log_every=1000", "train.clip_grad=1.0"]
VISION = [*LM, "model.vision.encoder.tile_size=28", "model.vision.encoder.width=32", "model.vision.encoder.layers=2",
          "model.vision.encoder.heads=2", "model.vision.encoder.intermediate_layers=[1]",
          "model.vision.encoder.n_global_layers=1", "model.vision.n_cross_attention_layers=1"]
SPEECH = [*LM, "model.speech.encoder.dim=32", "model.speech.encoder.n_heads=2", "model.speech.encoder.ffn_dim=64",
          "model.speech.adapter.dim=32", "model.speech.adapter.n_heads=2", "model.speech.adapter.ffn_dim=64"]

# objective -> (tiny stage, overrides); `{lm}` is a saved random LM of the LM shape above
OBJECTIVES = {
    "vision_lm": ("vision_adapter", [*VISION, "init.from={lm}", "train.options.encoder_from=null", "train.seq_len=48",
                                     "train.micro_batch=2"]),
    "video_lm": ("video_adapter", [*VISION, "init.from={lm}", "model.video.n_latents=4", "train.seq_len=48",
                                   "train.micro_batch=2"]),
    "clip": ("image_encoder_pretrain", [*VISION, "train.options.embed_dim=32", "train.options.text_width=32",
                                        "train.options.text_layers=1", "train.options.text_heads=2",
                                        "train.micro_batch=3"]),
    "bestrq": ("speech_encoder_pretrain", [*SPEECH, "train.seq_len=200", "train.micro_batch=2"]),
    "speech_lm": ("speech_adapter", [*SPEECH, "init.from={lm}", "train.options.encoder_from=null",
                                     "train.options.eval_max_new_tokens=3", "train.micro_batch=2"]),
    "sft": ("sft", [*LM, "init.from={lm}", "train.seq_len=128", "train.micro_batch=2"]),
    "reward_model": ("reward_model", [*LM, "init.from={lm}", "train.seq_len=128", "train.micro_batch=2"]),
    "dpo": ("dpo", [*LM, "init.from={lm}", "train.seq_len=96", "train.micro_batch=2"]),
}
RESUMED = "vision_lm"  # its DP run stops after 2 steps and a second launch stage resumes it to 3


@pytest.fixture(scope="module")
def root(tmp_path_factory, demo_data):
    """The demo tokenizer with the demo image, video, speech and dialog shards."""
    from mm_llama.data.demo_dialog import write_dialog
    from mm_llama.data.demo_speech import write_speech
    from mm_llama.data.demo_video import write_video
    from mm_llama.data.demo_vision import write_image

    out = tmp_path_factory.mktemp("mm_demo")
    shutil.copy(demo_data / "tokenizer.model", out / "tokenizer.model")
    write_image(out, n_train=16, n_val=4)
    write_video(out, n_train=8, n_val=4)
    write_speech(out, source="assets")
    write_dialog(out)
    return out


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from mm_llama.checkpoint.native import save_native
    from mm_llama.model import Transformer, init_weights

    cfg = load_config(StageConfig, "configs/stages/tiny/sft.yaml", LM)
    lm = Transformer(cfg.model.lm)
    init_weights(lm, torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("lm") / "final"
    save_native(lm, ModelConfig(name="tiny_lm", lm=cfg.model.lm), folder)
    return folder


def stage(objective, root, lm_dir, out, *extra) -> StageConfig:
    name, overrides = OBJECTIVES[objective]
    overrides = [o.replace("{lm}", str(lm_dir)) for o in overrides]
    return load_config(StageConfig, f"configs/stages/tiny/{name}.yaml",
                       [*overrides, *COMMON, f"data.root={root}", f"run.out_dir={out}", *extra])


def torchrun(configs: list, tmp_path, timeout=600):
    """Write each StageConfig (or pass an `unfinish=` word) and train them in turn in one 2-process launch."""
    args = []
    for i, cfg in enumerate(configs):
        if isinstance(cfg, str):
            args.append(cfg)
            continue
        path = tmp_path / f"stage_{i}.yaml"
        path.write_text(dump_config(cfg))
        args.append(str(path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(DP), "--master_port", str(_port()),
           "--no-python", sys.executable, "-c", DRIVER, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pipelined_runs(stage, runs: dict, root, lm_dir, tmp):
    """Every run of `runs` (name -> (case, layout words)) trained by `stage(case, root, lm_dir, out, *layout)`
    configs in one launch, each into `tmp / name`."""
    torchrun([stage(case, root, lm_dir, tmp / run, *layout) for run, (case, layout) in runs.items()], tmp)
    return tmp


def single_process_runs(stage, cases, root, lm_dir, tmp) -> dict:
    """The single-process run of every case: 3 steps with a checkpoint kept at step 2."""
    return {name: train_stage(stage(name, root, lm_dir, tmp / name, "train.steps=3", "run.keep_last=2"))
            for name in cases}


def first_two_steps_agree(run, ref) -> tuple[list, list]:
    """Assert a 2-step parallel run's losses, token counts and gradient norms equal the single-process run's
    first two steps; returns both runs' metric rows."""
    got, want = rows(run), rows(ref)[:2]
    assert [r["step"] for r in got] == [1, 2]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-4)
    return got, want


class Interleaved:
    """What `DP` data-parallel ranks read, as one single-process loader: rank 0's batch, rank 1's, in turn.

    With `train.grad_accum = DP` one single-process step takes one batch of every rank: the global batch."""

    def __init__(self, parts):
        self.parts = parts

    def __iter__(self):
        for group in zip(*self.parts):
            yield from group

    def state_dict(self):
        return [p.state_dict() for p in self.parts]

    def stats(self):
        return self.parts[0].stats()


def single_global_batch(cfg: StageConfig) -> object:
    """The single-process run of `cfg` on the DP ranks' global batch (their loaders interleaved, accumulated)."""
    cls = type(task_for(cfg))
    own = cls.loader
    mp = pytest.MonkeyPatch()
    mp.setattr(cls, "loader", lambda self, seq_len, batch, rank, world: Interleaved(
        [own(self, seq_len, batch, r, DP) for r in range(DP)]))
    try:
        return train_stage(cfg.model_copy(update={"train": cfg.train.model_copy(update={"grad_accum": DP})}))
    finally:
        mp.undo()


def same_final(run, ref):
    final, expected = load_file(str(run / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for k in expected:
        assert final[k].dtype == expected[k].dtype, k
        torch.testing.assert_close(final[k], expected[k], atol=1e-5, rtol=1e-4, msg=k)
    assert (run / "final" / "model.yaml").read_text() == (ref / "final" / "model.yaml").read_text()
    got = json.loads((run / "final" / "summary.json").read_text())
    want = json.loads((ref / "final" / "summary.json").read_text())
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if isinstance(v, float)} == pytest.approx(
        {k: v for k, v in want.items() if isinstance(v, float)}, abs=1e-5)


TP = "parallel.tp=2"


@pytest.fixture(scope="module")
def dp_runs(root, lm_dir, tmp_path_factory):
    """Every objective trained with FSDP over 2 data-parallel ranks, the resumed one in two parts, and vision_lm
    with TP=2 (in `tp/`): one launch."""
    tmp = tmp_path_factory.mktemp("dp")
    configs = []
    for objective in OBJECTIVES:
        out = tmp / objective
        if objective == RESUMED:
            configs += [stage(objective, root, lm_dir, out), f"unfinish={out / 'final'}"]
            configs.append(stage(objective, root, lm_dir, out, "train.steps=3"))
        else:
            configs.append(stage(objective, root, lm_dir, out))
    configs.append(stage("vision_lm", root, lm_dir, tmp / "tp" / "vision_lm", TP))
    torchrun(configs, tmp)
    return tmp


def test_every_registered_objective_is_covered():
    task_for(load_config(StageConfig, "configs/stages/tiny/sft.yaml"))  # imports every task module
    assert set(TASKS) - {"lm"} <= set(OBJECTIVES)  # 'lm': tests/test_parallel_engine.py


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_data_parallel_step_equals_the_single_process_step_on_the_global_batch(objective, dp_runs, root, lm_dir,
                                                                               tmp_path):
    steps = ["train.steps=3"] if objective == RESUMED else []
    ref = single_global_batch(stage(objective, root, lm_dir, tmp_path / "single", *steps))
    run = dp_runs / objective
    got, want = rows(run), rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, len(want) + 1))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    same_final(run, ref)


def test_frozen_parts_are_sharded_but_hold_no_optimizer_state(dp_runs):
    """vision_lm freezes the LM: its weights are in the distributed checkpoint, its optimizer moments are not."""
    keys = FileSystemReader(str(dp_runs / RESUMED / "checkpoints" / "step_00000003")).read_metadata().state_dict_metadata
    assert "model.lm.layers.0.attention.wq.weight" in keys and "model.cross_attention.1.attention.wq.weight" in keys
    moments = [k for k in keys if k.startswith("optim.state.") and k.endswith(".exp_avg")]
    assert moments and not [k for k in moments if k.startswith("optim.state.lm.")]
    assert any(k.startswith("optim.state.cross_attention.") for k in moments)


@pytest.mark.parametrize("objective", [RESUMED, "bestrq", "sft", "reward_model", "dpo"])
def test_a_data_parallel_run_resumes_in_one_process(objective, dp_runs, root, lm_dir, tmp_path):
    """The DP=2 checkpoint holds two data positions; one process deals them to its one loader (`data/resplit.py`)
    and trains on."""
    run = tmp_path / objective
    shutil.copytree(dp_runs / objective, run)
    shutil.rmtree(run / "final")
    last = rows(run)[-1]["step"]
    train_stage(stage(objective, root, lm_dir, run, f"train.steps={last + 1}"))
    assert [r["step"] for r in rows(run)] == list(range(1, last + 2))


@pytest.fixture(scope="module")
def tp_runs(root, lm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    torchrun([stage(o, root, lm_dir, tmp / "tp" / o, TP) for o in ("speech_lm", "clip")], tmp)
    return tmp


def _tp_matches_single_process(run, objective, root, lm_dir, tmp_path):
    ref = train_stage(stage(objective, root, lm_dir, tmp_path / "single"))
    assert [r["loss"] for r in rows(run)] == pytest.approx([r["loss"] for r in rows(ref)], abs=1e-5)
    same_final(run, ref)


def test_tensor_parallel_vision_lm_reproduces_the_single_process_losses(dp_runs, root, lm_dir, tmp_path):
    """TP=2 splits the LM and cross-attention blocks and the ViT MLPs; with one data-parallel rank the run sees
    the single process's batches."""
    _tp_matches_single_process(dp_runs / "tp" / "vision_lm", "vision_lm", root, lm_dir, tmp_path)


@pytest.mark.slow  # a second launch
@pytest.mark.parametrize("objective", ["speech_lm", "clip"])
def test_tensor_parallel_conformer_and_clip_reproduce_the_single_process_losses(objective, tp_runs, root, lm_dir,
                                                                                tmp_path):
    """speech_lm: the Conformer's attention and FFNs split; clip: the ViT and text-tower MLPs split."""
    _tp_matches_single_process(tp_runs / "tp" / objective, objective, root, lm_dir, tmp_path)



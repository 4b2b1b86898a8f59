"""Pipeline parallelism (parallel.pp=2, CPU, gloo, 2 processes) of the objectives besides 'lm' and 'vision_lm':
text SFT, the speech adapter stage (speech_lm), speech SFT and the video adapter stage (video_lm) reproduce the
single-process run: losses, gradient norms and held-out losses per step, and the weights after two optimizer steps
(within fp32 tolerance). The distributed checkpoint a pipelined run writes holds the whole model's keys; a single
process resumes it to the single-process run's third step, and so does the pipelined run itself. Layouts that
cannot be pipelined are refused naming the objective or the key (the preference objectives:
`test_parallel_pp_preference.py`); and, without a process group, how a batch is
padded and its speech clips are dealt to the micro-batches.

On the tiny models (2 LM layers) stage 0 holds the embedding, the media encoders and layer 0, stage 1 layer 1 and
the output (with the video model's cross-attention blocks, before layer 1), so the hidden state and the
aggregated video frames cross the pipeline."""
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import test_parallel_multimodal as multimodal
from mm_llama.config import ConfigError, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.parallel import ParallelDims, ParallelRun
from mm_llama.parallel.pipeline import PipelineShape
from mm_llama.parallel.pipeline_media import SpeechStage
from mm_llama.train.engine import train_stage
from mm_llama.train.tasks import task_for
from test_parallel_multimodal import (COMMON, LM, SPEECH, VISION, first_two_steps_agree, pipelined_runs, rows,
                                      single_process_runs, torchrun)

root, lm_dir = multimodal.root, multimodal.lm_dir  # the demo media shards and a saved random LM (fixtures)

PP = "parallel.pp=2"
# name -> (tiny stage, overrides): the adapters start fresh (the video gates at zero: step 1 opens them, so step 2
# trains the aggregator through the pipeline)
CASES = {
    "sft": ("sft", [*LM, "init.from={lm}", "train.seq_len=128", "train.micro_batch=2"]),
    "speech_lm": ("speech_adapter", [*SPEECH, "init.from={lm}", "train.options.encoder_from=null",
                                     "train.options.eval_max_new_tokens=2", "train.micro_batch=2"]),
    "speech_sft": ("speech_sft", [*SPEECH, "init.from={lm}", "train.micro_batch=2"]),
    "video_lm": ("video_adapter", [*VISION, "init.from={lm}", "model.video.n_latents=4", "train.seq_len=48",
                                   "train.micro_batch=2", "train.options.caption_contrastive=0"]),
}
# a constant learning rate large enough that a wrong gradient would move the weights apart by far more than the
# tolerance (and, with no schedule, the first 2 steps of a 3-step run are the 2-step run's). AdamW's eps at 1e-6:
# at 1e-8 a weight whose gradient is near eps moves by a part of the learning rate on the fp32 noise in that gradient
# (the pipeline pads the rows and sums in another order), and on some draws of the demo data one weight in 10^4 of
# the speech or video adapter ended 2e-5 to 5e-5 away after two steps, while every loss and gradient norm agreed.
COMMON_PP = ["train.eval_every=1", "optim.lr=1e-2", "optim.eps=1e-6", "optim.warmup_steps=0",
             "optim.schedule=constant"]
# what each case trains: some of these weights must move, or comparing them would prove nothing
TRAINED = {"sft": "layers.", "speech_lm": "speech_adapter.", "speech_sft": "speech_encoder.",
           "video_lm": "video_aggregator."}


def stage(name, root, lm_dir, out, *extra) -> StageConfig:
    config, overrides = CASES[name]
    overrides = [o.replace("{lm}", str(lm_dir)) for o in overrides]
    return load_config(StageConfig, f"configs/stages/tiny/{config}.yaml",
                       [*overrides, *COMMON, *COMMON_PP, f"data.root={root}", f"run.out_dir={out}", *extra])


# pipelined run -> (case, layout): every case with 1F1B over 2 stages, and the video model with the interleaved
# schedule over 4 (2 per rank: embedding and encoders | layer 0 | layer 1 and its cross-attention blocks | output),
# where a stage passes on the aggregated frames without reading them and the last one reads none
RUNS = {**{name: (name, [PP]) for name in CASES},
        "video_lm_interleaved": ("video_lm", [PP, "parallel.pp_schedule=interleaved_1f1b"])}


@pytest.fixture(scope="module")
def pp_runs(root, lm_dir, tmp_path_factory):
    """Every pipelined run trained 2 steps: one launch."""
    return pipelined_runs(stage, RUNS, root, lm_dir, tmp_path_factory.mktemp("pp"))


@pytest.fixture(scope="module")
def single_runs(root, lm_dir, tmp_path_factory):
    """The single-process runs, 3 steps with a checkpoint at step 2."""
    return single_process_runs(stage, CASES, root, lm_dir, tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("run_name", list(RUNS))
def test_pipelined_run_reproduces_the_single_process_run(run_name, pp_runs, single_runs):
    name = RUNS[run_name][0]
    run, ref = pp_runs / run_name, single_runs[name]
    got, want = first_two_steps_agree(run, ref)
    assert [r["val_loss"] for r in got] == pytest.approx([r["val_loss"] for r in want], abs=1e-5)
    final = load_file(str(run / "final" / "model.safetensors"))
    expected = load_file(str(ref / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=1e-5, rtol=1e-4, msg=k)
    third = load_file(str(ref / "final" / "model.safetensors"))
    moved = [k for k in expected if k.startswith(TRAINED[name]) and (expected[k] - third[k]).abs().max() > 1e-3]
    assert moved  # the media parts learn at this learning rate: a wrong gradient could not pass as the same weights
    assert (run / "final" / "model.yaml").read_text() == (ref / "final" / "model.yaml").read_text()


@pytest.mark.parametrize("name", list(CASES))
def test_a_pipelined_checkpoint_resumes_in_one_process(name, pp_runs, single_runs, root, lm_dir, tmp_path):
    """The pp=2 distributed checkpoint holds the whole model's keys (and only those); one process loads model and
    optimizer state from it and its third step is the single-process run's."""
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
        torch.testing.assert_close(final[k], expected[k], atol=1e-5, rtol=1e-4, msg=k)


def test_a_pipelined_run_resumes_at_the_same_layout(pp_runs, single_runs, root, lm_dir, tmp_path):
    """Each pipeline rank's optimizer holds other parameters: the pp=2 text SFT run resumes from its own checkpoint
    at pp=2 to the single-process run's third step all the same (a second launch)."""
    run = tmp_path / "sft"
    shutil.copytree(pp_runs / "sft", run)
    shutil.rmtree(run / "final")
    torchrun([stage("sft", root, lm_dir, run, PP, "train.steps=3")], tmp_path)
    got, want = rows(run), rows(single_runs["sft"])
    assert [r["step"] for r in got] == [1, 2, 3]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    final, expected = (load_file(str(d / "final" / "model.safetensors")) for d in (run, single_runs["sft"]))
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.parametrize("name,layout,refused", [
    ("clip", [PP], "'clip': parallel.pp cuts a language model and supports the 'lm', 'vision_lm', 'video_lm', "
     r"'speech_lm', 'sft', 'reward_model', 'dpo' objectives only \(not the encoder pre-training\)"),
    ("bestrq", [PP], "'bestrq': parallel.pp .* objectives only"),
    ("video_lm", [PP, "train.options.caption_contrastive=0.5"],
     r"'video_lm': parallel.pp > 1 with train.options.caption_contrastive > 0 is not supported"),
    ("vision_sft", [PP], "'sft' with a model.vision section: parallel.pp .* not image or video SFT"),
    ("speech_lm", [PP, "parallel.cp=2"], "'speech_lm': parallel.pp > 1 together with parallel.cp"),
])
def test_layouts_a_pipeline_cannot_use_are_refused(name, layout, refused, root, lm_dir, tmp_path):
    configs = {**CASES, "clip": ("image_encoder_pretrain", VISION), "bestrq": ("speech_encoder_pretrain", SPEECH),
               "vision_sft": ("vision_sft", [*VISION, "init.from={lm}", "train.options.lm_from=null"])}
    config, overrides = configs[name]
    cfg = load_config(StageConfig, f"configs/stages/tiny/{config}.yaml",
                      [o.replace("{lm}", str(lm_dir)) for o in overrides] + [f"data.root={root}", *layout])
    task = task_for(cfg)
    model = task.build_model() if name in ("vision_sft", "speech_lm") else torch.nn.Linear(1, 1)
    with pytest.raises(ConfigError, match=refused):
        ParallelRun.setup_task(model, task, cfg, ParallelDims(dp=1, pp=2, cp=cfg.parallel.cp, tp=cfg.parallel.tp),
                               torch.device("cpu"), torch.float32, lambda block: None)


def test_a_short_speech_batch_is_padded_and_its_clips_dealt_to_the_micro_batches():
    """3 rows (clips 1, 0 and 2 of them) padded to 4: the last row is repeated with its 2 clips and no labels; in 2
    micro-batches the first gets rows 0-1 and clip 0, the second rows 2-3 and clips 1, 2, 1, 2."""
    from mm_llama.model.speech_lm import SpeechLM

    cfg = load_config(StageConfig, "configs/stages/tiny/speech_adapter.yaml", SPEECH)
    model = SpeechLM(cfg.model.lm, cfg.model.speech)
    start, sp, end = model.speech_ids
    tokens = torch.tensor([[1, start, sp, sp, end, 2], [3, 4, 5, 6, 7, 8], [start, sp, end, start, sp, end]])
    labels = torch.roll(tokens, -1, 1)
    feats, lengths = torch.arange(3.0)[:, None, None].expand(3, 5, 80), torch.tensor([5, 4, 3])
    batch = SimpleNamespace(tokens=tokens, labels=labels, feats=feats, feat_lengths=lengths)
    first = SpeechStage(model, [0], True, False)
    args_, targets, local = first.step_inputs(batch, PipelineShape(seq_len=8, rows=4, pad_id=0), "cpu")
    assert args_[0].shape == targets.shape == (4, 8)
    assert args_[0][3].tolist() == [start, sp, end, start, sp, end, 0, 0]
    assert (targets[3] == -100).all() and (targets[:3, 6:] == -100).all()
    assert targets[:3, :6].tolist() == labels.tolist()
    first.queue(local, 2)
    dealt = [(tok.shape[0], clips[0][:, 0, 0].tolist(), clips[1].tolist()) for tok, _, clips in first.inputs]
    assert dealt == [(2, [0.0], [5]), (2, [1.0, 2.0, 1.0, 2.0], [4, 3, 4, 3])]

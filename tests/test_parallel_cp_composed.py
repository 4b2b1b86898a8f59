"""Context parallelism of the composed models under torchrun (CPU, gloo, 2 processes): with every gate open,
the CP loss and gradients of the video+image model, the speech model and a packed text LM equal the whole
sequence's in one process; the image, video and speech adapter stages with parallel.cp=2 reproduce the
single-process losses and final weights (within 1e-5), and so does vision_lm with parallel.pp=2; and,
without a process group, how a CP rank's batch is cut and which layouts are refused.

The sequence is split after the embedding; each rank encodes every image, clip or video of the batch, takes
its query rows of the cross-attention masks and the loss on its labels (`mm_llama.parallel.context_parallel`)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_parallel_multimodal as multimodal
from mm_llama.config import ConfigError, dump_config
from mm_llama.parallel import ParallelDims, ParallelRun
from mm_llama.parallel.context_parallel import ComposedCP, local_index
from mm_llama.train.engine import train_stage
from mm_llama.train.losses import lm_loss_sum
from mm_llama.train.tasks import task_for
from test_parallel_engine import _port
from test_parallel_multimodal import rows, same_final, stage

root, lm_dir = multimodal.root, multimodal.lm_dir  # the demo media shards and a saved random LM (fixtures)

CP = "parallel.cp=2"
PP = "parallel.pp=2"
COMPOSED = ("vision_lm", "video_lm", "speech_lm", "sft")  # sft: the bare LM, its embedding output cut
PER_TOKEN = {"video_lm": ["train.options.caption_contrastive=0"]}  # a per-clip term cannot be split (refused below)
TESTS = Path(__file__).parent
DRIVER = ("import sys, torch; torch.set_num_threads(1)\n"
          "import torch.distributed as dist\n"
          f"sys.path.insert(0, {str(TESTS)!r})\n"
          "from mm_llama.config import load_config\n"
          "from mm_llama.config.stage import StageConfig\n"
          "from mm_llama.train.engine import train_stage\n"
          "dist.init_process_group('gloo')\n"
          "for arg in sys.argv[1:]:\n"
          "    if arg.startswith('check='):\n"
          "        from test_parallel_cp_composed import model_check\n"
          "        model_check(arg.split('=', 1)[1])\n"
          "    else:\n"
          "        train_stage(load_config(StageConfig, arg))\n")


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor | None = None


def _cases():
    """(name, model, batch, media keyword arguments): every gate open, so that the media change the logits;
    sequence lengths that are not multiples of 2·cp, so that a batch is padded."""
    from mm_llama.model import Transformer
    from serve_helpers import lm_args, speech_model
    from test_video_model import inputs, video_model

    tokens, images, ratios, videos, vratios, frames = inputs()
    tokens = tokens[:, :10]  # <|image|> at 3, <|video|> at 6 (row 0) and 1 (row 1)
    labels = torch.randint(0, 80, tokens.shape, generator=torch.Generator().manual_seed(2))
    labels[0, :2] = -100
    media = dict(images=images, aspect_ratios=ratios, videos=videos, video_aspect_ratios=vratios, frame_mask=frames)
    yield "video", video_model(gates=0.5).train(), Batch(tokens, labels), media

    speech = speech_model().train()
    for p in speech.speech_adapter.output.parameters():  # the adapter's frames must differ from the embeddings
        p.data.mul_(10)
    start, sp, end = speech.speech_ids
    feats = torch.randn(2, 40, 80, generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([40, 24])
    with torch.no_grad():
        n = speech.encode_speech(feats, lengths)[1].tolist()
    rows_ = [[5, start, *[sp] * n[0], end, 6, 7], [8, 9, 10, start, *[sp] * n[1], end, 11]]
    width = max(map(len, rows_)) + 1
    width += (width % 4 == 0)  # not a multiple of 2·cp
    tok = torch.tensor([r + [12] * (width - len(r)) for r in rows_])
    doc_ids = (torch.arange(width) >= width - 3).long().expand(2, -1).clone()  # a second packed document at the end
    yield "speech", speech, Batch(tok, torch.roll(tok, -1, 1), doc_ids), dict(speech_feats=feats, speech_lengths=lengths)

    torch.manual_seed(0)
    lm = Transformer(lm_args()).train()
    tok = torch.randint(0, 200, (2, 14), generator=torch.Generator().manual_seed(4))
    doc_ids = torch.tensor([[0] * 5 + [1] * 9, [0] * 14])
    yield "text", lm, Batch(tok, torch.roll(tok, -1, 1), doc_ids), {}


def model_check(out: str) -> None:
    """Under torchrun with 2 ranks: each case's loss and gradients through the whole sequence (reference) and
    through CP=2 (summed over the ranks); rank 0 saves both to `out`."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from mm_llama.parallel.context_parallel import apply_cp_composed

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("cp",))
    results = {}
    for name, model, batch, media in _cases():
        parallel = copy.deepcopy(model)
        kwargs = dict(media, **({"doc_ids": batch.doc_ids} if batch.doc_ids is not None else {}))
        ref = lm_loss_sum(model(batch.tokens, **kwargs), batch.labels)
        ref.backward()
        cp = apply_cp_composed(parallel, mesh["cp"], pad_id=0)
        local = cp.local_batch(batch)
        kwargs = dict(media, **({"doc_ids": local.doc_ids} if local.doc_ids is not None else {}))
        loss = lm_loss_sum(parallel(local.tokens, **kwargs), local.labels)
        loss.backward()
        loss = loss.detach()
        dist.all_reduce(loss)
        grads = {}
        for (k, p), q in zip(model.named_parameters(), parallel.parameters()):
            if q.grad is not None:
                dist.all_reduce(q.grad)
                grads[k] = (p.grad, q.grad)
        if hasattr(parallel, "embed"):  # called outside the forward (a task's own use), `embed` is whole
            text = torch.full((1, 7), 5)  # 7 tokens: not even a multiple of 2·cp
            results.setdefault("embed_outside", {})[name] = parallel.embed(text).shape[1] == 7
        with cp.disabled(), torch.no_grad():  # switched off: the whole sequence again
            kwargs = dict(media, **({"doc_ids": batch.doc_ids} if batch.doc_ids is not None else {}))
            whole = parallel(batch.tokens, **kwargs)
        results[name] = {"loss": (ref.detach(), loss), "grads": grads, "off": (model(batch.tokens, **kwargs).detach(), whole)}
    if dist.get_rank() == 0:
        torch.save(results, out)


def launch(args: list[str], tmp_path: Path, timeout: int = 600) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           "--no-python", sys.executable, "-c", DRIVER, *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def cp_runs(root, lm_dir, tmp_path_factory):
    """The model-level check, every composed objective trained with CP=2 and vision_lm with PP=2 (one
    data-parallel rank each): one launch."""
    tmp = tmp_path_factory.mktemp("cp")
    args = [f"check={tmp / 'check.pt'}"]
    configs = [stage(o, root, lm_dir, tmp / o, CP, *PER_TOKEN.get(o, [])) for o in COMPOSED]
    configs.append(stage("vision_lm", root, lm_dir, tmp / "pp" / "vision_lm", PP))
    for i, cfg in enumerate(configs):
        path = tmp / f"stage_{i}.yaml"
        path.write_text(dump_config(cfg))
        args.append(str(path))
    launch(args, tmp)
    return tmp


@pytest.mark.parametrize("case", ["video", "speech", "text"])
def test_cp_loss_and_gradients_equal_the_whole_sequence(case, cp_runs):
    result = torch.load(cp_runs / "check.pt")[case]
    ref, got = result["loss"]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    grads = result["grads"]
    media = {"video": ("cross_attention.", "video_cross_attention.", "video_aggregator.", "vision."),
             "speech": ("speech_encoder.", "speech_adapter."), "text": ("tok_embeddings.",)}[case]
    for prefix in media:  # the media parts got gradients through the local rows
        assert any(k.startswith(prefix) and want.abs().sum() > 0 for k, (want, _) in grads.items()), prefix
    for k, (want, have) in grads.items():
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-4, msg=k)
    torch.testing.assert_close(*reversed(result["off"]), atol=1e-6, rtol=1e-6)
    if case != "text":
        assert torch.load(cp_runs / "check.pt")["embed_outside"][case]


@pytest.mark.parametrize("objective", COMPOSED)
def test_context_parallel_reproduces_the_single_process_run(objective, cp_runs, root, lm_dir, tmp_path):
    ref = train_stage(stage(objective, root, lm_dir, tmp_path / "single", *PER_TOKEN.get(objective, [])))
    got, want = rows(cp_runs / objective), rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-4)
    same_final(cp_runs / objective, ref)  # summary.json: the held-out metrics, evaluated with CP switched off


def test_pipelined_vision_lm_reproduces_the_single_process_run(cp_runs, root, lm_dir, tmp_path):
    """PP=2 on the tiny image model (2 LM layers, cross-attention before layer 1): stage 0 holds the encoder and
    layer 0, stage 1 the cross-attention block, layer 1 and the output, so the image tokens cross the pipeline."""
    ref = train_stage(stage("vision_lm", root, lm_dir, tmp_path / "single"))
    run = cp_runs / "pp" / "vision_lm"
    got, want = rows(run), rows(ref)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-4)
    final, expected = (load_file(str(d / "final" / "model.safetensors")) for d in (run, ref))
    assert final.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=1e-5, rtol=1e-4, msg=k)
    got, want = (json.loads((d / "final" / "summary.json").read_text()) for d in (run, ref))
    assert got["val_loss"] == pytest.approx(want["val_loss"], abs=1e-5)  # a pipelined task reports its loss only


def test_a_cp_rank_gets_the_whole_padded_sequence_and_its_own_labels():
    from mm_llama.data.dialog import SFTBatch

    tokens = torch.arange(10).view(1, 10) + 100  # 10 tokens: padded to 12 = a multiple of 2·cp
    labels = tokens + 1000
    doc_ids = torch.tensor([[0] * 4 + [1] * 6])
    batch = SFTBatch(tokens, labels, doc_ids)
    parts = [ComposedCP(2, r, pad_id=7).local_batch(batch) for r in range(2)]
    for r, part in enumerate(parts):
        assert part.tokens.tolist() == [[*range(100, 110), 7, 7]]
        assert part.doc_ids.tolist() == [[0] * 4 + [1] * 8]  # the padding joins the last document
        padded = [*range(1100, 1110), -100, -100]
        assert part.labels.tolist() == [[padded[i] for i in local_index(12, 2, r).tolist()]]
    assert sorted(sum((p.labels[0].tolist() for p in parts), [])) == sorted(padded)
    assert batch.tokens.shape == (1, 10)  # the loader's batch is left as it was


@pytest.mark.parametrize("objective,layout,refused", [
    ("dpo", CP, "'dpo': parallel.cp .* 'vision_lm', 'video_lm', 'speech_lm', 'sft' objectives only"),
    ("video_lm", f"{CP} train.options.caption_contrastive=0.5", "'video_lm': parallel.cp > 1 with "
     "train.options.caption_contrastive > 0 is not supported"),
    ("clip", PP, "'clip': parallel.pp cuts a language model and supports the 'lm', 'vision_lm', 'video_lm', "
     "'speech_lm', 'sft', 'reward_model', 'dpo' objectives only"),
])
def test_layouts_a_task_cannot_use_are_refused_naming_the_objective(objective, layout, refused, root, lm_dir,
                                                                    tmp_path):
    cfg = stage(objective, root, lm_dir, tmp_path / "x", *layout.split())
    pp, cp = cfg.parallel.pp, cfg.parallel.cp
    with pytest.raises(ConfigError, match=refused):
        ParallelRun.setup_task(torch.nn.Linear(1, 1), task_for(cfg), cfg, ParallelDims(dp=1, pp=pp, cp=cp, tp=1),
                               torch.device("cpu"), torch.float32, lambda block: None)

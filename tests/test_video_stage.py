"""The video stage: only the aggregator and the video cross-attention train, it runs end to end through the engine
from an image model, evaluates held-out motion questions, resumes, and lands in the pipeline report."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.config import ConfigError, ModelConfig
from mm_llama.config.load import CONFIG_ROOT, read_yaml, validate
from mm_llama.config.stage import StageConfig
from mm_llama.data.demo_video import caption, demo_clips, questions, write_video
from mm_llama.infer.loading import save_multimodal
from mm_llama.model.multimodal import MultimodalModel
from mm_llama.train.engine import train_stage
from mm_llama.train.tasks import task_for
from mm_llama.train.trainable import select_trainable

RANKS = 300
VIDEO_PARTS = ("video_aggregator.", "video_cross_attention.")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from mm_llama.text import train_tokenizer

    out = tmp_path_factory.mktemp("video")
    write_video(out, n_train=16, n_val=4)
    train, _ = demo_clips(100, 1)
    words = [caption(m) + " " + " ".join(q["question"] + " " + q["answer"] for q in questions(m)) for m in train]
    train_tokenizer(words, RANKS, out / "tokenizer.model")
    return out


def tiny_model() -> dict:
    return {"name": "t", "lm": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": RANKS + 256,
                                "multiple_of": 16, "max_seq_len": 128},
            "vision": {"encoder": {"tile_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 2,
                                   "max_num_tiles": 2, "intermediate_layers": [1], "n_global_layers": 1,
                                   "attention_bias": True},
                       "n_cross_attention_layers": 2},
            "video": {"max_frames": 8, "frames_per_group": 4, "n_latents": 4}}


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    """A composed image model folder, as vision_anneal leaves it (image gates open, so the image path matters)."""
    cfg = ModelConfig.model_validate({k: v for k, v in tiny_model().items() if k != "video"})
    torch.manual_seed(5)
    model = MultimodalModel(cfg.lm, cfg.vision)
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.gate_attn.fill_(0.5)
    return save_multimodal(model, cfg, tmp_path_factory.mktemp("image") / "model")


def stage(root, out, init, **train) -> StageConfig:
    data = read_yaml(CONFIG_ROOT / "stages" / "tiny" / "video_adapter.yaml")
    data["model"] = tiny_model()
    data["init"] = {"from": str(init)}
    data["data"].update(root=str(root), num_workers=0)
    data["run"].update(out_dir=str(out), checkpoint_every=2)
    data["train"].update({"steps": 3, "micro_batch": 4, "eval_batches": 2, "eval_every": 0, **train})
    return validate(StageConfig, data, "video_adapter")


def test_only_video_parts_get_gradients(root, image_model, tmp_path):
    cfg = stage(root, tmp_path / "run", image_model)
    task = task_for(cfg)
    model = task.build_model()
    image = load_file(image_model / "model.safetensors")
    for k, v in model.state_dict().items():  # everything but the new video parts comes from the image model
        if not k.startswith(VIDEO_PARTS):
            assert torch.equal(v, image[k]), k
    assert all(b.gate_attn.item() == 0 and b.gate_ffwd.item() == 0 for b in model.video_cross_attention.values())
    chosen = select_trainable(model, cfg.train.trainable, cfg.train.frozen)
    assert chosen and all(n.startswith(VIDEO_PARTS) for n in chosen)
    assert {n for n, p in model.named_parameters() if n.startswith(VIDEO_PARTS)} == set(chosen)
    batch = next(iter(task.loader(cfg.train.seq_len, 4, 0, 1)))
    assert batch.videos.shape[:3] == (4, 1, 8) and (batch.tokens == task.tokenizer.video_id).sum() == 4
    with torch.no_grad():  # open the video gates so that every video parameter is reachable by the loss
        for block in model.video_cross_attention.values():
            block.gate_attn.fill_(0.5)
            block.gate_ffwd.fill_(0.5)
    task.loss(model, batch, "cpu").backward()
    for name, p in model.named_parameters():
        if name.startswith(VIDEO_PARTS):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_video_stage_end_to_end_and_resume(root, image_model, tmp_path):
    out = train_stage(stage(root, tmp_path / "run", image_model))
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert {"val_video_acc_motion", "val_video_majority_motion", "val_video_chance_motion", "val_loss"} <= set(summary)
    assert summary["val_video_chance_motion"] == 0.25
    final = load_file(out / "final" / "model.safetensors")
    image = load_file(image_model / "model.safetensors")
    for k, v in image.items():  # frozen: bit for bit the image model
        assert torch.equal(final[k], v), k
    assert not torch.equal(final["video_cross_attention.1.gate_attn"], torch.zeros(1))
    optimizer = torch.load(out / "checkpoints" / "step_00000002" / "optimizer.pt", weights_only=True)
    n_video = sum(1 for k in final if k.startswith(VIDEO_PARTS))
    assert len(optimizer["state"]) == n_video  # no optimizer state for anything frozen
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    # as if killed after the step-2 checkpoint: the resumed run reproduces step 3 exactly
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "final")
    shutil.rmtree(again / "checkpoints" / "step_00000003")
    train_stage(stage(root, again, image_model))
    resumed = [json.loads(line)["loss"] for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert resumed == losses

    from mm_llama.pipeline.report import stage_metrics

    flat = stage_metrics("video_adapter", summary)
    assert flat["video_adapter.video_qa_accuracy_motion"] == summary["val_video_acc_motion"]
    assert flat["video_adapter.video_qa_accuracy_motion_baseline"] == summary["val_video_majority_motion"]
    assert not any("chance" in k or "majority" in k for k in flat)

    # a later video stage starts from this one: every weight, the time tables resized to more frames
    longer = stage(root, tmp_path / "sft", out)
    longer = longer.model_copy(update={"model": ModelConfig.model_validate(
        {**tiny_model(), "video": {"max_frames": 16, "frames_per_group": 8, "n_latents": 4}})})
    model = task_for(longer).build_model()
    table = final["video_aggregator.time_embedding"]
    assert model.video_aggregator.time_embedding.shape == (16, 32)
    assert torch.equal(model.video_aggregator.time_embedding[0], table[0])
    assert torch.allclose(model.video_aggregator.time_embedding[-1], table[-1])
    gain = final["video_aggregator.time_gain"]
    assert model.video_aggregator.time_gain.shape == (16, 32)
    assert torch.equal(model.video_aggregator.time_gain[0], gain[0])
    assert torch.allclose(model.video_aggregator.time_gain[-1], gain[-1])
    assert torch.equal(model.video_aggregator.slot_gain, final["video_aggregator.slot_gain"])


def test_video_stage_input_errors(root, image_model, tmp_path):
    no_video = stage(root, tmp_path / "x", image_model)
    no_video = no_video.model_copy(update={"model": ModelConfig.model_validate(
        {k: v for k, v in tiny_model().items() if k != "video"})})
    with pytest.raises(ConfigError, match="needs a model with vision: and video:"):
        task_for(no_video)
    bad_token = stage(root, tmp_path / "y", image_model)
    bad_token = bad_token.model_copy(update={"model": ModelConfig.model_validate(
        {**tiny_model(), "video": {**tiny_model()["video"], "video_token_id": 5}})})
    with pytest.raises(ConfigError, match="tokenizer's <\\|video\\|>"):
        task_for(bad_token).check()


def test_caption_contrastive_loss_values():
    from mm_llama.train.losses import caption_contrastive_loss

    torch.manual_seed(0)
    media, text = torch.randn(4, 8), torch.randn(4, 8)
    sim = torch.nn.functional.normalize(media, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T / 0.1
    arange = torch.arange(4)
    clip = 0.5 * (torch.nn.functional.cross_entropy(sim, arange) + torch.nn.functional.cross_entropy(sim.T, arange))
    assert torch.allclose(caption_contrastive_loss(media, text, torch.eye(4, dtype=torch.bool), 0.1), clip)
    # rows 0 and 1 share a caption: each row's target is split evenly between both columns (and likewise per column)
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    target = same.float() / same.float().sum(1, keepdim=True)
    expected = -0.5 * ((target * sim.log_softmax(1)).sum(1).mean() + (target * sim.T.log_softmax(1)).sum(1).mean())
    assert torch.allclose(caption_contrastive_loss(media, text, same, 0.1), expected)


def test_caption_contrastive_term(root, image_model, tmp_path):
    """Off: the answer loss alone. On: plus weight × InfoNCE(mean aggregated token, mean caption embedding) × labelled
    tokens; it reaches the aggregator even with the video gates closed, and nothing frozen gets a gradient."""
    from mm_llama.data.demo_video import caption as demo_caption
    from mm_llama.train.losses import IGNORE, caption_contrastive_loss, lm_loss_sum

    plain = task_for(stage(root, tmp_path / "a", image_model, options={"targets": ["qa"]}))
    cfg = stage(root, tmp_path / "b", image_model, options={"targets": ["qa"], "caption_contrastive": 2.0,
                                                             "contrastive_temperature": 0.2})
    task = task_for(cfg)
    model = task.build_model()
    batch = next(iter(task.loader(cfg.train.seq_len, 4, 0, 1)))
    captions = {demo_caption(m) for m in demo_clips(16, 4)[0]}
    decoded = {task.tokenizer.decode(c) for c in batch.captions}
    assert decoded <= captions and all(batch.captions)
    assert next(iter(plain.loader(cfg.train.seq_len, 4, 0, 1))).captions == [[]] * 4  # only asked for when on

    labels = batch.labels
    media = batch.media_inputs("cpu")
    context = model.encode_videos(media["videos"], media["video_aspect_ratios"], media["frame_mask"])
    answer = lm_loss_sum(model(batch.tokens, video_context=context), labels)
    video = context.tokens.mean((1, 2, 3))  # one video of one group per clip here
    text = torch.stack([model.lm.tok_embeddings.weight[torch.tensor(c)].mean(0) for c in batch.captions])
    same = torch.tensor([[a == b for b in batch.captions] for a in batch.captions])
    expected = answer + 2.0 * caption_contrastive_loss(video, text, same, 0.2) * (labels != IGNORE).sum()
    loss = task.loss(model, batch, "cpu")
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(plain.loss(model, batch, "cpu"), answer, rtol=1e-5)

    loss.backward()  # gates at zero: only the contrastive term reaches the aggregator
    assert model.video_aggregator.latents.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    context = model.encode_videos(media["videos"], media["video_aspect_ratios"], media["frame_mask"])
    task.caption_contrastive(model, context, batch.captions, "cpu").backward()
    assert model.lm.tok_embeddings.weight.grad is None  # the caption side is the fixed LM table

    batch.captions = [batch.captions[0], [], [], []]  # one captioned clip: nothing to contrast
    assert torch.allclose(task.loss(model, batch, "cpu"), answer, rtol=1e-5)
    with pytest.raises(ConfigError, match="caption_contrastive"):
        task_for(stage(root, tmp_path / "c", image_model, options={"caption_contrastive": -1.0}))

"""Post-training with media and moving references: dialogs that carry their images, the vision reward
model (language-RM init, frozen LM, penalty), the EMA-updated DPO reference (math and exact resume)."""
import io
import json
import math
import shutil

import pytest
import torch
import webdataset as wds
from PIL import Image

from mm_llama.checkpoint import save_native
from mm_llama.config import ConfigError, ModelConfig, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.config.vision import VisionConfig
from mm_llama.data import DataConfig
from mm_llama.data.demo_dialog import image_preference_samples, write_dialog
from mm_llama.data.dialog import EncodedRanking, ImageParts, PreferenceLoader, Record, media_members
from mm_llama.data.text_stream import SkipSample
from mm_llama.model import LlamaArgs, Transformer
from mm_llama.model.reward import RewardModel, VisionRewardModel, load_reward_model
from mm_llama.post.ema import EMAReference
from mm_llama.text import ChatFormat, load_tokenizer
from mm_llama.train.checkpointing import write_model
from mm_llama.train.engine import train_stage
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.dpo import collate_pairs, dpo_terms
from mm_llama.train.tasks.reward import collate_rankings, rewards

SMALL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 4352, "multiple_of": 16,
         "max_seq_len": 256}
VISION = {"encoder": {"tile_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 4, "max_num_tiles": 2,
                      "intermediate_layers": [1, 2], "n_global_layers": 1}, "n_cross_attention_layers": 1}
FAST = [f"model.lm.{k}={v}" for k, v in SMALL.items()] + ["model.lm.use_scaled_rope=false", "train.eval_batches=2",
                                                           "run.log_every=1000"]


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (30, 20), colour).save(buf, format="JPEG")
    return buf.getvalue()


def image_ranking(member="jpg"):
    user = {"role": "user", "content": [{"type": "image", "member": member}, {"type": "text", "text": "What colour?"}]}
    return json.dumps({"prompt": [user], "responses": ["Red.", "Blue."], "strength": "better"})


@pytest.fixture(scope="module")
def root(demo_data):
    write_dialog(demo_data)
    return demo_data


@pytest.fixture(scope="module")
def chat(root):
    return ChatFormat(load_tokenizer(root / "tokenizer.model"))


# ------------------------------------------------------------------------------ media in dialog records


def test_media_parts_resolve_to_members_of_the_same_sample():
    messages = [{"role": "user", "content": [{"type": "image", "member": "front.jpg"}, {"type": "image"},
                                             {"type": "text", "text": "Compare."}]}]
    assert media_members(messages, {"front.jpg": b"a", "clip.flac": b"b"}) == [("image", "front.jpg")] * 2
    with pytest.raises(SkipSample, match="2 image members"):  # no member named and two images to pick from
        media_members(messages, {"front.jpg": b"a", "back.png": b"b"})
    with pytest.raises(SkipSample, match="'left.jpg'.*does not hold"):
        media_members([{"role": "user", "content": [{"type": "image", "member": "left.jpg"}]}], {"jpg": b"x"})
    assert media_members([{"role": "user", "content": [{"type": "audio"}]}], {"flac": b"x", "jpg": b"y"}) == \
        [("audio", "flac")]


def test_preference_loader_decodes_images_and_counts_bad_media(chat, tmp_path):
    path = tmp_path / "p.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "good", "json": image_ranking().encode(), "jpg": jpeg((200, 0, 0))})
        sink.write({"__key__": "missing", "json": image_ranking("png").encode(), "jpg": jpeg((0, 0, 200))})
        sink.write({"__key__": "corrupt", "json": image_ranking().encode(), "jpg": b"\xff\xd8not a jpeg"})
        sink.write({"__key__": "good2", "json": image_ranking().encode(), "jpg": jpeg((0, 200, 0))})
    cfg = DataConfig(root=str(tmp_path), sources=[{"name": "s", "shards": "p.tar"}], shuffle=False)
    vision = PreferenceLoader(cfg, 0, chat=chat, batch_size=2, decode_media=ImageParts(28, 2))
    batch = next(iter(vision))
    assert all(len(e.media) == 1 and e.media[0].tiles.shape[1:] == (3, 28, 28) for e in batch)
    assert chat.tokenizer.image_id in batch[0].prompt
    assert vision.stats()["skipped_samples"] == 2  # the missing member and the undecodable image
    text = PreferenceLoader(cfg, 0, chat=chat, batch_size=1)
    with pytest.raises(SkipSample, match="text model"):
        text.encode(Record(image_ranking(), {"jpg": jpeg((1, 2, 3))}), 0)


def test_demo_image_rankings_are_checkable_from_the_pixels():
    samples = image_preference_samples(12, "val")
    for s in samples:
        record = s["json"]
        assert record["prompt"][0]["content"][0] == {"type": "image", "member": "jpg"}
        image = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        assert image.size == (84, 84)
        right, wrong = record["responses"]
        assert right != wrong and record["kind"] in ("colour", "shape", "count")
    colour = [s for s in samples if s["json"]["kind"] == "colour"]
    assert colour  # the right colour is the one the shapes are drawn in: the brightest pixels' hue
    from mm_llama.data.demo_vision import COLOURS

    for s in colour:
        pixels = Image.open(io.BytesIO(s["jpg"])).convert("RGB").tobytes()
        pixels = [tuple(pixels[i:i + 3]) for i in range(0, len(pixels), 3)]
        brightest = max(pixels, key=sum)
        nearest = min(COLOURS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLOURS[c], brightest)))
        assert s["json"]["responses"][0] == f"{nearest.capitalize()}."


# ------------------------------------------------------------------------------ the vision reward model


def vision_rm(seed=0) -> VisionRewardModel:
    torch.manual_seed(seed)
    model = VisionRewardModel(LlamaArgs(**SMALL), VisionConfig(**VISION)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.value_head.weight, std=0.5)
        for block in model.cross_attention.values():  # open the gates so the image matters
            block.gate_attn.fill_(1.0)
            block.gate_ffwd.fill_(1.0)
    return model


def test_vision_rm_scores_each_response_as_if_alone_with_its_image(chat):
    model = vision_rm()
    img = chat.tokenizer.image_id
    tiles = [ImageParts(28, 2)("image", "jpg", jpeg(c)) for c in ((250, 10, 10), (10, 10, 250))]
    ex = [EncodedRanking([1, img, 5, 6], [[7, 8], [9, 10, 11], [12]], [[True] * 2, [True] * 3, [True]], 0,
                         media=[tiles[0]]),
          EncodedRanking([1, img, 5], [[20], [21, 22]], [[True], [True] * 2], 1, media=[tiles[1]])]
    batch = collate_rankings(ex, 0, order_seed=3, max_tiles=2)
    assert batch.images.shape == (2, 1, 2, 3, 28, 28)
    with torch.no_grad():
        got = rewards(model, batch, "cpu").view(2, 3)
        for b, e in enumerate(ex):
            one = collate_rankings([e], 0, None, max_tiles=2)
            for k, r in enumerate(e.responses):
                alone = model(torch.tensor([e.prompt + r]), images=one.images, aspect_ratios=one.aspect_ratios)
                assert float(got[b, k]) == pytest.approx(float(alone[0, -1]), abs=1e-5)
        other = collate_rankings([EncodedRanking(ex[0].prompt, ex[0].responses, ex[0].loss_masks, 0,
                                                 media=[tiles[1]])], 0, None, max_tiles=2)
        assert not torch.allclose(rewards(model, other, "cpu")[:3], got[0])  # the image changes the reward
    text = RewardModel(model.lm)
    text.value_head.weight.data.copy_(model.value_head.weight.data)
    tokens = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(model(tokens), text(tokens))  # no image: exactly the language RM


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A language RM, a composed image–text model (same LM shape) and a plain LM, saved natively."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    rm = RewardModel(LlamaArgs(**SMALL))
    torch.nn.init.normal_(rm.value_head.weight, std=0.3)
    (folder / "rm").mkdir()
    write_model(rm, ModelConfig(name="rm", lm=LlamaArgs(**SMALL)), folder / "rm")
    composed = vision_rm(2)
    state = {k: v for k, v in composed.state_dict().items() if k != "value_head.weight"}
    from mm_llama.checkpoint.native import write_safetensors
    from mm_llama.config import dump_config

    (folder / "vlm").mkdir()
    write_safetensors(state, folder / "vlm" / "model.safetensors")
    (folder / "vlm" / "model.yaml").write_text(dump_config(ModelConfig(name="v", lm=LlamaArgs(**SMALL),
                                                                       vision=VisionConfig(**VISION))))
    save_native(Transformer(LlamaArgs(**SMALL)), ModelConfig(name="lm", lm=LlamaArgs(**SMALL)), folder / "lm")
    return folder


def vision_rm_stage(root, out, models, *overrides):
    vision = [f"model.vision.encoder.{k}={v}" for k, v in VISION["encoder"].items()]
    vision = [v.replace(" ", "") for v in vision] + ["model.vision.n_cross_attention_layers=1"]
    return load_config(StageConfig, "configs/stages/tiny/reward_model.yaml", [
        *FAST, *vision, f"data.root={root}", f"run.out_dir={out}", f"init.from={models / 'vlm'}",
        "data.sources=[{name: img, shards: 'dialog/image-pref-train-*.tar'}]",
        "data.heldout=[{name: imgval, shards: 'dialog/image-pref-val-*.tar'}]",
        f"train.options.language_rm={models / 'rm'}", "train.options.logit_penalty=0.1",
        "train.trainable=['vision.*','cross_attention.*']", "train.seq_len=48", *overrides])


def test_vision_rm_stage_takes_the_language_rm_and_trains_only_vision_parts(root, checkpoints, tmp_path):
    cfg = vision_rm_stage(root, tmp_path / "vrm", checkpoints, "train.steps=2", "train.micro_batch=2")
    task = task_for(cfg)
    start = task.build_model()
    rm = RewardModel(LlamaArgs(**SMALL))
    from mm_llama.post.average import read_model

    rm.load_state_dict(read_model(checkpoints / "rm")[0])
    vlm = read_model(checkpoints / "vlm")[0]
    torch.testing.assert_close(start.value_head.weight, rm.value_head.weight)
    torch.testing.assert_close(start.lm.layers[0].attention.wq.weight, rm.lm.layers[0].attention.wq.weight)
    torch.testing.assert_close(start.cross_attention["1"].gate_attn, vlm["cross_attention.1.gate_attn"])
    run = train_stage(cfg)
    trained, config = load_reward_model(run)
    assert isinstance(trained, VisionRewardModel) and config.vision is not None
    torch.testing.assert_close(trained.lm.layers[1].feed_forward.w2.weight, rm.lm.layers[1].feed_forward.w2.weight)
    torch.testing.assert_close(trained.value_head.weight, rm.value_head.weight)
    assert not torch.equal(trained.vision.projection.weight, start.vision.projection.weight)
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert 0 <= summary["val_accuracy"] <= 1 and math.isfinite(summary["val_reward_sq"])


def test_vision_rm_needs_a_language_rm_or_a_vision_rm(root, checkpoints):
    cfg = vision_rm_stage(root, "unused", checkpoints, "train.options.language_rm=null")
    with pytest.raises(ConfigError, match="language_rm"):
        task_for(cfg).build_model()
    with pytest.raises(ConfigError, match="does not fit|lacks"):
        task_for(vision_rm_stage(root, "unused", checkpoints, f"init.from={checkpoints / 'lm'}")).build_model()


# ------------------------------------------------------------------------------ DPO: NLL target, EMA reference


def test_nll_is_on_the_rankings_best_response():
    ex = EncodedRanking([1, 2], [[3], [4], [5]], [[True], [True], [True]], 0)
    b = collate_pairs([ex, EncodedRanking([1], [[6], [7]], [[True], [True]], 1)], 0)
    assert b.better.tolist() == [0, 0, 1, 3] and b.worse.tolist() == [1, 2, 2, 4] and b.best.tolist() == [0, 0, 0, 3]
    policy, reference = torch.tensor([-1.0, -2.0, -3.0]), torch.zeros(3)
    counts = torch.tensor([2, 4, 1])
    pair = (torch.tensor([1]), torch.tensor([2]))
    on_best = dpo_terms(policy, reference, counts, *pair, beta=1.0, nll_weight=0.5, nll_rows=torch.tensor([0]))
    on_better = dpo_terms(policy, reference, counts, *pair, beta=1.0, nll_weight=0.5)
    dpo = math.log1p(math.exp(-1.0))  # margin (−2) − (−3) = 1
    assert float(on_best["loss"]) == pytest.approx(dpo + 0.5 * 1.0 / 2)
    assert float(on_better["loss"]) == pytest.approx(dpo + 0.5 * 2.0 / 4)


def test_ema_reference_moves_towards_the_policy_every_k_steps():
    torch.manual_seed(0)
    policy, ref = Transformer(LlamaArgs(**SMALL)), Transformer(LlamaArgs(**SMALL))
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    ema = EMAReference(ref, every=3, decay=0.75)
    key = "layers.0.attention.wq.weight"
    assert not any(ema.step(policy, s) for s in (0, 1, 2, 2))
    assert ema.step(policy, 3) and not ema.step(policy, 3)  # once per step, whatever the micro-batches
    torch.testing.assert_close(ref.state_dict()[key], 0.75 * start[key] + 0.25 * policy.state_dict()[key])
    assert not any(p.requires_grad for p in ref.parameters())
    with pytest.raises(RuntimeError, match="missed"):
        ema.step(policy, 9)
    with pytest.raises(ValueError):
        EMAReference(ref, every=0, decay=0.5)


def dpo_stage(root, out, lm_dir, *overrides):
    return load_config(StageConfig, "configs/stages/tiny/dpo.yaml",
                       [*FAST, f"data.root={root}", f"run.out_dir={out}", f"init.from={lm_dir}", "train.micro_batch=2",
                        *overrides])


def test_ema_reference_dpo_resumes_exactly(root, checkpoints, tmp_path):
    ema = ["train.options.reference_ema={every: 2, decay: 0.5}", "train.steps=6", "run.checkpoint_every=3",
           "optim.lr=1.0e-2", "train.eval_every=0"]
    full = train_stage(dpo_stage(root, tmp_path / "full", checkpoints / "lm", *ema))
    losses = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step_00000006")
    resumed = train_stage(dpo_stage(root, cut, checkpoints / "lm", *ema))
    again = [json.loads(x)["loss"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert again == pytest.approx(losses, abs=1e-6) and len(again) == 6
    # the reference really moved: the same run with a frozen reference has other losses after step 2
    frozen = train_stage(dpo_stage(root, tmp_path / "frozen", checkpoints / "lm", *ema[1:]))
    other = [json.loads(x)["loss"] for x in (frozen / "metrics.jsonl").read_text().splitlines()]
    # row i trains after i−1 steps: the reference first moves after 2 steps, so rows 3.. differ
    assert other[:2] == pytest.approx(losses[:2], abs=1e-6) and other[2:] != pytest.approx(losses[2:], abs=1e-6)
    with pytest.raises(ConfigError, match="reference_ema"):
        task_for(dpo_stage(root, "unused", checkpoints / "lm", "train.options.reference=stored",
                           "train.options.reference_ema={every: 2, decay: 0.5}"))

"""The vision training stages: CLIP encoder pre-training, the vision adapter, annealing at a higher tile size."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mm_llama.config import ConfigError, ModelConfig
from mm_llama.config.load import CONFIG_ROOT, read_yaml, validate
from mm_llama.config.stage import StageConfig
from mm_llama.data.demo_vision import write_image
from mm_llama.model import Transformer
from mm_llama.train.engine import train_stage
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.clip import retrieval_top1
from mm_llama.train.tasks.vision_lm import (ChatBatch, ChatExamples, CollateChat, answer_accuracy, load_composed,
                                           resize_positions, shrink_tiles)

RANKS = 300


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from mm_llama.data.demo_vision import caption, demo_scenes
    from mm_llama.text import train_tokenizer

    out = tmp_path_factory.mktemp("vision")
    write_image(out, n_train=24, n_val=6)
    train, _ = demo_scenes(200, 1)
    words = [caption(s) for s in train] + ["What colour is the shape? How many shapes are there? Where is it?"] * 5
    train_tokenizer(words, RANKS, out / "tokenizer.model")
    return out


def tiny_model(tile: int = 28) -> dict:
    return {"name": "t", "lm": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": RANKS + 256,
                                "multiple_of": 16, "max_seq_len": 128},
            "vision": {"encoder": {"tile_size": tile, "patch_size": 14, "width": 32, "layers": 2, "heads": 2,
                                   "max_num_tiles": 2, "intermediate_layers": [1], "n_global_layers": 1,
                                   "attention_bias": True},
                       "n_cross_attention_layers": 1}}


def stage(name: str, root, out, tile=28, **edits) -> StageConfig:
    data = read_yaml(CONFIG_ROOT / "stages" / "tiny" / f"{name}.yaml")
    data["model"] = tiny_model(tile)
    data["data"]["root"] = str(root)
    data["data"]["num_workers"] = 0
    data["run"].update(out_dir=str(out), checkpoint_every=2)
    data["train"].update(steps=2, micro_batch=4, eval_batches=2, eval_every=0)
    data.pop("init", None)
    for dotted, value in edits.items():
        *path, key = dotted.split("__")
        node = data
        for p in path:
            node = node.setdefault(p, {})
        node[key] = value
    return validate(StageConfig, data, name)


# ------------------------------------------------------------------------------------------- pieces


def test_retrieval_counts_equal_captions_as_right():
    image = torch.eye(3)
    text = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]])  # image 0 -> text 1, image 1 -> text 0, 2 -> 2
    got = retrieval_top1(image, text, ["a", "b", "c"])
    assert got == {"val_retrieval_i2t": pytest.approx(1 / 3), "val_retrieval_t2i": pytest.approx(1 / 3),
                   "val_retrieval_chance": pytest.approx(1 / 3)}
    same = retrieval_top1(image, text, ["a", "a", "c"])  # captions 0 and 1 are equal: swapping them is right
    assert same["val_retrieval_i2t"] == 1.0 and same["val_retrieval_chance"] == pytest.approx(5 / 9)


def test_resize_positions_keeps_the_class_row_and_constants():
    cls, width = torch.randn(1, 8), 8
    table = torch.cat([cls, torch.full((16, width), 0.5)])  # grid 4
    tiles = torch.randn(3, 2, 17, width)
    state = {"vit.positional_embedding": table, "tile_position_embedding": tiles, "other": torch.ones(2)}
    out = resize_positions(state, "", 6)
    assert out["vit.positional_embedding"].shape == (37, width) and out["tile_position_embedding"].shape == (3, 2, 37, width)
    assert torch.equal(out["vit.positional_embedding"][0], cls[0])
    assert torch.allclose(out["vit.positional_embedding"][1:], torch.full((36, width), 0.5), atol=1e-6)
    assert torch.equal(out["tile_position_embedding"][..., 0, :], tiles[..., 0, :]) and out["other"] is state["other"]
    assert resize_positions(state, "", 4)["vit.positional_embedding"] is table


def test_shrink_tiles_keeps_each_remaining_grid_and_its_first_tiles(tmp_path):
    """A 4-tile encoder's tile tables cut to 2 tiles: row of grid g in the small table == row of g in the big one,
    tiles [:2]; a composed model saved with 4 tiles loads into one of 2 (and of 1) with every other weight equal."""
    from encoders.vision.transform import supported_aspect_ratios
    from mm_llama.infer.loading import save_multimodal
    from mm_llama.model.multimodal import MultimodalModel

    def config(tiles):
        return ModelConfig.model_validate({
            "name": "t", "lm": {"dim": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 300,
                                "multiple_of": 16, "max_seq_len": 64},
            "vision": {"encoder": {"tile_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 2,
                                   "max_num_tiles": tiles, "intermediate_layers": [1], "n_global_layers": 1},
                       "n_cross_attention_layers": 1}})

    big_cfg = config(4)
    torch.manual_seed(0)
    big = MultimodalModel(big_cfg.lm, big_cfg.vision)
    folder = save_multimodal(big, big_cfg, tmp_path / "big")
    big_ids = {g: i for i, g in enumerate(supported_aspect_ratios(4), start=1)}
    for tiles in (2, 1):
        small_cfg = config(tiles)
        small = MultimodalModel(small_cfg.lm, small_cfg.vision)
        load_composed(small, folder)
        for name in ("pre_tile_embedding", "tile_position_embedding", "post_tile_embedding"):
            got, full = getattr(small.vision, name), getattr(big.vision, name)
            assert got.shape[:2] == (len(supported_aspect_ratios(tiles)) + 1, tiles)
            assert torch.equal(got[0], full[0, :tiles])
            for i, grid in enumerate(supported_aspect_ratios(tiles), start=1):
                assert torch.equal(got[i], full[big_ids[grid], :tiles]), (name, grid)
        small_state, big_state = small.state_dict(), big.state_dict()
        for k, v in small_state.items():
            if not k.endswith(("tile_embedding", "tile_position_embedding")):
                assert torch.equal(v, big_state[k]), k
    state = {"pre_tile_embedding": torch.zeros(3, 2, 4)}
    assert shrink_tiles(state, "", 4)["pre_tile_embedding"] is state["pre_tile_embedding"]  # never grown
    with pytest.raises(ValueError, match="rows do not fit 2 tiles"):
        shrink_tiles({"pre_tile_embedding": torch.zeros(5, 2, 4)}, "", 1)


def test_chat_examples_label_only_the_answer(root):
    from mm_llama.data.image_text import Tiled
    from mm_llama.text import load_tokenizer

    tok = load_tokenizer(root / "tokenizer.model")
    sample = {"__key__": "k", "json": json.dumps({"qa": [{"type": "colour", "question": "What colour?", "answer": "red"}],
                                                  "caption": "a red circle"}).encode()}
    image = Tiled(torch.zeros(1, 3, 28, 28), (1, 1))
    examples = ChatExamples(tok, ["qa", "caption"], 64, every=True)(sample, image, 0)
    assert [(e.kind, e.answer) for e in examples] == [("colour", "red"), ("caption", "a red circle")]
    batch = CollateChat(tok.pad_id, 2)(examples)
    for row, e in zip(batch.labels, examples):
        target = row[row != -100].tolist()
        assert target == tok.encode(e.answer, bos=False, eos=False) + [tok.eot_id]
    assert batch.tokens[0].tolist().count(tok.image_id) == 1 and batch.images.shape == (2, 1, 2, 3, 28, 28)
    assert (batch.tokens[0, len(examples[0].tokens) - 1:] == tok.pad_id).all()  # the shorter row is right-padded
    with pytest.raises(Exception, match="more than train.seq_len"):
        ChatExamples(tok, ["qa"], 5)(sample, image, 0)


class _Oracle(torch.nn.Module):
    """Logits that are right on every labelled position except where `wrong` says."""

    def __init__(self, labels, wrong):
        super().__init__()
        self.labels, self.wrong = labels, wrong

    def forward(self, tokens, images=None, aspect_ratios=None):
        logits = torch.zeros(*tokens.shape, 10)
        target = self.labels.clamp(min=0).clone()
        target[self.wrong] = (target[self.wrong] + 1) % 10
        return logits.scatter(-1, target[..., None], 5.0)


def test_answer_accuracy_and_blind_baselines():
    labels = torch.tensor([[-100, 1, 2], [-100, 3, -100], [-100, 1, 2], [-100, 4, -100]])
    batch = ChatBatch(torch.zeros(4, 3, dtype=torch.long), labels, torch.zeros(4, 1, 1, 3, 2, 2),
                      torch.ones(4, 1, 2, dtype=torch.long), ["colour", "colour", "colour", "shape"],
                      ["red", "blue", "red", "circle"])
    wrong = torch.zeros(4, 3, dtype=torch.bool)
    wrong[2, 2] = True  # the second token of the third answer is wrong
    got = answer_accuracy(_Oracle(labels, wrong), [batch], "cpu", lambda: torch.autocast("cpu", enabled=False))
    assert got["val_acc_colour"] == pytest.approx(2 / 3) and got["val_acc_shape"] == 1.0
    assert got["val_chance_colour"] == 0.25 and got["val_chance_shape"] == pytest.approx(1 / 3)
    assert got["val_majority_colour"] == pytest.approx(2 / 3) and got["val_majority_shape"] == 1.0


# ------------------------------------------------------------------------------------- through the engine


def test_clip_then_adapter_then_anneal(root, tmp_path, capsys):
    clip_dir = train_stage(stage("image_encoder_pretrain", root, tmp_path / "clip", train__options__context_length=8))
    summary = json.loads((clip_dir / "final" / "summary.json").read_text())
    assert {"val_retrieval_i2t", "val_retrieval_t2i", "val_retrieval_chance", "val_loss"} <= set(summary)
    clip_weights = load_file(clip_dir / "final" / "model.safetensors")
    assert any(k.startswith("text.") for k in clip_weights) and "logit_scale" in clip_weights

    # an LM to start from, as a text stage would leave it
    from mm_llama.checkpoint.native import save_native

    lm_cfg = ModelConfig(name="lm", lm=tiny_model()["lm"])
    torch.manual_seed(3)
    save_native(Transformer(lm_cfg.lm), lm_cfg, tmp_path / "lm")
    lm_weights = load_file(tmp_path / "lm" / "model.safetensors")

    cfg = stage("vision_adapter", root, tmp_path / "adapter", init={"from": str(tmp_path / "lm")},
                train__options__encoder_from=str(clip_dir))
    built = task_for(cfg).build_model()
    for k, v in built.vision.state_dict().items():
        if not k.startswith("projection."):
            assert torch.equal(v, clip_weights[f"vision.{k}"]), k
    adapter_dir = train_stage(cfg)
    adapted = load_file(adapter_dir / "final" / "model.safetensors")
    for k, v in lm_weights.items():  # the LM is frozen
        assert torch.equal(adapted[f"lm.{k}"], v), k
    assert not torch.equal(adapted["vision.projection.weight"], built.vision.projection.weight.detach())
    summary = json.loads((adapter_dir / "final" / "summary.json").read_text())
    assert {"val_acc_colour", "val_chance_colour", "val_majority_shape"} <= set(summary)
    # `mm-llama eval` on the run directory: the stage's own held-out evaluation, the same figures
    from mm_llama.cli import main

    capsys.readouterr()
    assert main(["eval", str(adapter_dir), "--task", "image_qa", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["image_qa.val_acc_colour"] == summary["val_acc_colour"]
    assert evaluated["image_qa.val_majority_shape"] == summary["val_majority_shape"]
    assert main(["eval", str(adapter_dir), "--task", "asr"]) == 1  # not a speech run: named, not attempted
    assert "needs a run of objective 'speech_lm'" in capsys.readouterr().err

    anneal = stage("vision_anneal", root, tmp_path / "anneal", tile=42, init={"from": str(adapter_dir)})
    model = task_for(anneal).build_model()
    assert model.vision.vit.positional_embedding.shape[0] == 3 * 3 + 1
    assert torch.equal(model.vision.vit.positional_embedding[0], adapted["vision.vit.positional_embedding"][0])
    assert torch.equal(model.cross_attention["1"].gate_attn, adapted["cross_attention.1.gate_attn"])
    out = train_stage(anneal)
    assert (out / "final" / "model.safetensors").is_file()


def test_stage_input_errors(root, tmp_path):
    no_vision = stage("image_encoder_pretrain", root, tmp_path / "x")
    no_vision = no_vision.model_copy(update={"model": ModelConfig(name="t", lm=tiny_model()["lm"])})
    with pytest.raises(ConfigError, match="needs a model with a vision: section"):
        task_for(no_vision)
    with pytest.raises(ConfigError, match="train.options"):
        task_for(stage("vision_adapter", root, tmp_path / "y", train__options__bogus=1))
    with pytest.raises(ConfigError, match="max_tiles"):
        task_for(stage("image_encoder_pretrain", root, tmp_path / "z", train__options__max_tiles=3))
    clip_dir = train_stage(stage("image_encoder_pretrain", root, tmp_path / "clip", train__options__context_length=8))
    wide = stage("vision_adapter", root, tmp_path / "w", train__options__encoder_from=str(clip_dir))
    wide = wide.model_copy(update={"model": ModelConfig.model_validate(
        {**tiny_model(), "vision": {**tiny_model()["vision"], "encoder": {**tiny_model()["vision"]["encoder"], "width": 64}}})})
    with pytest.raises(ConfigError, match="does not fit model.vision.encoder"):
        task_for(wide).build_model()
    with pytest.raises(ConfigError, match="not a run directory or model folder"):
        task_for(stage("vision_adapter", root, tmp_path / "v", train__options__encoder_from=str(tmp_path / "nope"))).check()

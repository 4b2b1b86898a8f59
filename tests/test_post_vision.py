"""Image SFT and vision DPO: the composed image–text model trained on dialogs that carry their images."""
import json
import math

import pytest
import torch

from mm_llama.checkpoint import save_native
from mm_llama.config import ConfigError, ModelConfig, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.config.vision import VisionConfig
from mm_llama.data.demo_dialog import write_dialog
from mm_llama.data.dialog import IGNORE
from mm_llama.infer.loading import save_multimodal
from mm_llama.model import LlamaArgs, Transformer
from mm_llama.model.multimodal import MultimodalModel
from mm_llama.post.average import read_model
from mm_llama.train.engine import train_stage
from mm_llama.train.losses import lm_loss_sum
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.sft import own_images_mask

SMALL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 4352, "multiple_of": 16,
         "max_seq_len": 256}
VISION = {"encoder": {"tile_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 4, "max_num_tiles": 2,
                      "intermediate_layers": [1, 2], "n_global_layers": 1, "attention_bias": True},
          "n_cross_attention_layers": 1}
FAST = [f"model.lm.{k}={v}" for k, v in SMALL.items()] + [
    *(f"model.vision.encoder.{k}={str(v).replace(' ', '')}" for k, v in VISION["encoder"].items()),
    "model.vision.n_cross_attention_layers=1", "train.eval_batches=2", "run.log_every=1000"]


@pytest.fixture(scope="module")
def root(demo_data):
    write_dialog(demo_data)
    return demo_data


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A composed image–text model with open gates (so images matter) and an LM of the same shape, saved."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(3)
    model = MultimodalModel(LlamaArgs(**SMALL), VisionConfig(**VISION))
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.gate_attn.fill_(1.0)
            block.gate_ffwd.fill_(1.0)
    save_multimodal(model, ModelConfig(name="v", lm=LlamaArgs(**SMALL), vision=VisionConfig(**VISION)), folder / "vlm")
    torch.manual_seed(4)
    save_native(Transformer(LlamaArgs(**SMALL)), ModelConfig(name="lm", lm=LlamaArgs(**SMALL)), folder / "lm")
    return folder


def stage(name, root, out, models, *overrides):
    return load_config(StageConfig, f"configs/stages/tiny/{name}.yaml",
                       [*FAST, f"data.root={root}", f"run.out_dir={out}", f"init.from={models / 'vlm'}", *overrides])


def sft_task(root, models, *overrides):
    return task_for(stage("vision_sft", root, "unused", models, "train.options.lm_from=null", *overrides))


# ------------------------------------------------------------------------------ image SFT


def test_image_sft_batch_packs_dialogs_apart_with_their_own_images(root, models):
    task = sft_task(root, models)
    model = task.build_model().eval()
    assert isinstance(model, MultimodalModel)
    batch = next(iter(task.loader(96, 2, 0, 1)))
    tok = task.tokenizer
    assert batch.images.shape[0] == 2 and batch.images.shape[2:] == (2, 3, 28, 28)
    assert int(batch.doc_ids[0].max()) >= 2  # several dialogs share a row
    # one image per dialog, in <|image|> order, each tagged with its dialog
    for r in range(2):
        starts = (batch.tokens[r] == tok.image_id).nonzero().squeeze(1)
        real = (batch.aspect_ratios[r].prod(-1) > 0).sum()
        assert len(starts) == real and batch.image_docs[r, :real].tolist() == batch.doc_ids[r, starts].tolist()
    # the loss covers the assistant's answer (the ranking's best response) and its terminator only
    text = lambda s: tok.encode(s, bos=False, eos=False)  # noqa: E731
    answers = [batch.labels[0][(batch.doc_ids[0] == d) & (batch.labels[0] != IGNORE)].tolist()
               for d in range(int(batch.doc_ids[0].max()))]
    assert all(a[-1] == tok.eot_id and tok.decode(a[:-1]).endswith(".") for a in answers)
    assert all(a[:-1] == text(tok.decode(a[:-1])) for a in answers)
    assert task.count(batch) == sum(map(len, answers)) + int((batch.labels[1] != IGNORE).sum())
    with torch.no_grad():
        packed = task.loss(model, batch, "cpu")
        logits = model(batch.tokens, images=batch.images, aspect_ratios=batch.aspect_ratios, doc_ids=batch.doc_ids,
                       vision_mask=own_images_mask(batch, tok.image_id, 2))
        # each dialog alone, with its own image, gives the same logits: no attention to a neighbour or its image
        alone = 0.0
        for r in range(2):
            for d in range(int(batch.doc_ids[r].max())):
                where = (batch.doc_ids[r] == d).nonzero().squeeze(1)
                img = (batch.image_docs[r] == d).nonzero().squeeze(1)
                own = model(batch.tokens[r:r + 1, where], images=batch.images[r:r + 1, img],
                            aspect_ratios=batch.aspect_ratios[r:r + 1, img])
                torch.testing.assert_close(logits[r, where], own[0], atol=1e-4, rtol=1e-4)
                alone += float(lm_loss_sum(own, batch.labels[r:r + 1, where]))
        assert float(packed) == pytest.approx(alone, abs=2e-3)
        swapped = batch.to("cpu")
        swapped.images = batch.images.flip(1)  # same slots, other pictures
        assert abs(float(task.loss(model, swapped, "cpu")) - float(packed)) > 1e-3  # images change the loss


def test_image_sft_stage_trains_only_the_trainable_parts(root, models, tmp_path):
    cfg = stage("vision_sft", root, tmp_path / "sft", models, f"train.options.lm_from={models / 'lm'}",
                "train.steps=2", "train.micro_batch=2", "train.seq_len=64", "optim.lr=1.0e-2")
    start = task_for(cfg).build_model().state_dict()
    lm = read_model(models / "lm")[0]
    torch.testing.assert_close(start["lm.layers.0.attention.wq.weight"], lm["layers.0.attention.wq.weight"])  # hot-swap
    run = train_stage(cfg)
    trained = read_model(run)[0]
    frozen = [k for k in trained if k.startswith("lm.")]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)
    for key in ("vision.projection.weight", "cross_attention.1.attention.wq.weight", "image_embedding.weight"):
        assert not torch.equal(trained[key], start[key]), key
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_image_sft_from_an_lm_starts_fresh_vision_parts_on_its_weights(root, models):
    model = sft_task(root, models, f"init.from={models / 'lm'}").build_model()
    lm = read_model(models / "lm")[0]
    key = "layers.1.feed_forward.w2.weight"
    torch.testing.assert_close(model.lm.state_dict()[key], lm[key])
    torch.testing.assert_close(model.image_embedding.weight[0], lm["tok_embeddings.weight"][model.image_token_id])
    assert not model.cross_attention["1"].gate_attn.detach().any()  # closed gates: exactly the LM
    with pytest.raises(ConfigError, match="differs from model.lm"):
        sft_task(root, models, "model.lm.n_layers=3", "model.vision.n_cross_attention_layers=1").build_model()


def test_lm_from_is_for_image_models_only(root, models):
    with pytest.raises(ConfigError, match="lm_from"):
        task_for(load_config(StageConfig, "configs/stages/tiny/sft.yaml",
                             [f"data.root={root}", f"train.options={{lm_from: {models / 'lm'}}}"]))


# ------------------------------------------------------------------------------ vision DPO


def test_vision_dpo_loss_is_the_hand_computed_one_with_images(root, models):
    task = task_for(stage("vision_dpo", root, "unused", models, "train.options.reference_ema=null"))
    policy = task.build_model().eval()
    with torch.no_grad():  # move the policy off its reference
        for p in policy.cross_attention.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(task.loader(48, 2, 0, 1)))
    assert batch.images.shape[:2] == (4, 1) and batch.better.tolist() == [0, 2] and batch.worse.tolist() == [1, 3]
    reference = task.reference_model("cpu")

    def logp(model, row):
        """Σ log p of the row's counted response tokens, the row run alone with its image."""
        keep = batch.labels[row] != IGNORE
        logits = model(batch.tokens[row:row + 1], images=batch.images[row:row + 1],
                       aspect_ratios=batch.aspect_ratios[row:row + 1])[0]
        return float(torch.log_softmax(logits.double(), -1)[keep, batch.labels[row][keep]].sum()), int(keep.sum())

    beta, alpha = task.opts.beta, task.opts.nll_weight
    with torch.no_grad():
        got = task.terms(policy, batch, "cpu")["loss"]
        for pair, (w, lose) in enumerate(zip(batch.better.tolist(), batch.worse.tolist())):
            (pw, n), (pl, _) = logp(policy, w), logp(policy, lose)
            rw, rl = logp(reference, w)[0], logp(reference, lose)[0]
            margin = beta * ((pw - rw) - (pl - rl))
            expected = math.log1p(math.exp(-margin)) + alpha * (-pw / n)
            assert float(got[pair]) == pytest.approx(expected, rel=1e-4)
        blind = task.terms(policy, type(batch)(batch.tokens, batch.labels, batch.better, batch.worse, batch.best,
                                               images=batch.images.flip(0), aspect_ratios=batch.aspect_ratios),
                           "cpu")["loss"]
    assert not torch.allclose(blind, got)  # the log-probs are computed with each prompt's own image


def test_vision_dpo_stage_with_ema_reference(root, models, tmp_path):
    cfg = stage("vision_dpo", root, tmp_path / "dpo", models, "train.steps=2", "train.micro_batch=2",
                "train.options.reference_ema={every: 1, decay: 0.5}")
    start = task_for(cfg).build_model().state_dict()
    run = train_stage(cfg)
    trained = read_model(run)[0]
    assert all(torch.equal(trained[k], start[k]) for k in trained if k.startswith(("lm.", "vision.")))
    key = "cross_attention.1.attention.wq.weight"
    assert not torch.equal(trained[key], start[key])
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert 0 <= summary["val_reward_accuracy"] <= 1 and math.isfinite(summary["val_loss"])

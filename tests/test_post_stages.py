"""SFT, reward-model and DPO stages through the engine; rejection sampling (prefix sharing, best kept, resume)."""
import json
import math

import pytest
import torch

from mm_llama.checkpoint import save_native
from mm_llama.config import ConfigError, ModelConfig, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.data.demo_dialog import write_dialog
from mm_llama.data.shards import read_shard
from mm_llama.infer.generate import Generator, Prompt
from mm_llama.infer.sampling import SamplingConfig
from mm_llama.model import LlamaArgs, Transformer
from mm_llama.model.reward import RewardModel
from mm_llama.post.rejection_sampling import (
    RejectionSamplingConfig,
    SamplingOptions,
    best_of,
    run_rejection_sampling,
    sample_responses,
    score_responses,
)
from mm_llama.text import ChatFormat, load_tokenizer
from mm_llama.train.checkpointing import write_model
from mm_llama.train.engine import train_stage
from mm_llama.train.tasks import task_for

SMALL = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 4352, "multiple_of": 16,
         "max_seq_len": 256}
FAST = [f"model.lm.{k}={v}" for k, v in SMALL.items()] + ["model.lm.use_scaled_rope=false", "train.eval_batches=2",
                                                           "run.log_every=1000"]


@pytest.fixture(scope="module")
def root(demo_data):
    write_dialog(demo_data)
    return demo_data


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("lm")
    save_native(Transformer(LlamaArgs(**SMALL)), ModelConfig(name="small", lm=LlamaArgs(**SMALL)), folder)
    return folder


def stage(name, root, out, *overrides):
    return load_config(StageConfig, f"configs/stages/tiny/{name}.yaml",
                       [*FAST, f"data.root={root}", f"run.out_dir={out}", *overrides])


@pytest.mark.parametrize("name,metric", [("sft", "val_loss"), ("reward_model", "val_accuracy"),
                                         ("dpo", "val_reward_accuracy")])
def test_post_training_stages_run_through_the_engine(root, lm_dir, tmp_path, name, metric, capsys):
    cfg = stage(name, root, tmp_path / name, f"init.from={lm_dir}", "train.steps=2", "train.micro_batch=2")
    run = train_stage(cfg)
    summary = json.loads((run / "final" / "summary.json").read_text())
    assert metric in summary and math.isfinite(summary[metric])
    if name == "reward_model":  # `mm-llama eval --task preference` reproduces the stage's held-out accuracy
        from mm_llama.cli import main

        capsys.readouterr()
        assert main(["eval", str(run), "--task", "preference", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["preference.val_accuracy"] == summary["val_accuracy"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_dpo_starts_at_log2_and_reward_margin_zero(root, lm_dir):
    cfg = stage("dpo", root, "unused", f"init.from={lm_dir}", "train.options.nll_weight=0.0")
    task = task_for(cfg)
    model = task.build_model()
    batch = next(iter(task.loader(96, 3, 0, 1)))
    assert float(task.loss(model, batch, "cpu").detach()) / task.count(batch) == pytest.approx(math.log(2), abs=1e-5)
    assert (batch.labels != -100).any() and not (batch.labels == task.chat.tokenizer.eot_id).any()


def test_stage_starts_from_the_average_of_its_models(root, lm_dir, tmp_path):
    torch.manual_seed(1)
    other = Transformer(LlamaArgs(**SMALL))
    save_native(other, ModelConfig(name="o", lm=LlamaArgs(**SMALL)), tmp_path / "other")
    cfg = stage("sft", root, "unused", f"init.from={lm_dir}", f"train.options.average_with=[{tmp_path / 'other'}]",
                "train.options.average_weights=[1.0,3.0]")
    model = task_for(cfg).build_model()
    first = Transformer(LlamaArgs(**SMALL))
    first.load_state_dict(__import__("mm_llama.post.average", fromlist=["read_model"]).read_model(lm_dir)[0])
    key = "layers.1.feed_forward.w2.weight"
    torch.testing.assert_close(model.state_dict()[key], 0.25 * first.state_dict()[key] + 0.75 * other.state_dict()[key])


def test_bad_post_options_are_named(root, lm_dir):
    with pytest.raises(ConfigError, match="train.options"):
        task_for(stage("dpo", root, "unused", f"init.from={lm_dir}", "train.options.beta=-1"))
    with pytest.raises(ConfigError, match="reference"):
        task_for(stage("dpo", root, "unused", "init.from=null"))
    with pytest.raises(ConfigError, match="average_weights"):
        task_for(stage("sft", root, "unused", f"init.from={lm_dir}", "train.options.average_with=[x]",
                       "train.options.average_weights=[1.0]"))


def test_shared_prefix_sampling_equals_one_prompt_at_a_time(root):
    torch.manual_seed(0)
    model = Transformer(LlamaArgs(**SMALL)).eval()
    tok = load_tokenizer(root / "tokenizer.model")
    prompts = [[tok.bos_id, 5, 6, 7, 8, 9], [tok.bos_id, 11, 12], [tok.bos_id, 300, 301, 302]]
    greedy = SamplingOptions(max_new_tokens=6, temperature=0.0)
    out = sample_responses(model, prompts, 3, greedy, set(tok.stop_tokens), [], None)
    for p, samples in zip(prompts, out):
        alone = Generator(model, tok).generate([Prompt(p)], SamplingConfig(max_new_tokens=6))[0].tokens
        assert samples == [alone] * 3
    sampled = sample_responses(model, prompts, 4, SamplingOptions(max_new_tokens=6, temperature=1.0),
                               set(tok.stop_tokens), [], torch.Generator().manual_seed(0))
    assert len({tuple(s) for s in sampled[0]}) > 1  # the K samples of a prompt differ


def test_rejection_sampling_keeps_the_best_and_resumes(root, lm_dir, tmp_path):
    torch.manual_seed(0)
    rm = RewardModel(LlamaArgs(**SMALL))
    torch.nn.init.normal_(rm.value_head.weight, std=1.0)
    (tmp_path / "rm").mkdir()
    write_model(rm, ModelConfig(name="rm", lm=LlamaArgs(**SMALL)), tmp_path / "rm")
    cfg = RejectionSamplingConfig(policy=str(lm_dir), reward_model=str(tmp_path / "rm"), root=str(root),
                                  prompts="dialog/prompts-*.tar", out_dir=str(tmp_path / "out"), samples_per_prompt=3,
                                  prompts_per_batch=2, prompts_per_shard=3, max_prompts=6,
                                  sampling={"max_new_tokens": 5}, device="cpu")
    summary = run_rejection_sampling(cfg)
    assert summary["prompts"] == 6 and summary["shards"] == 2 and 0 <= summary["best_accuracy"] <= 1
    chat = ChatFormat(load_tokenizer(root / "tokenizer.model"))
    rm = rm.eval()
    first = (tmp_path / "out" / "sft-000001.tar").read_bytes()
    for sample in read_shard(str(tmp_path / "out" / "sft-000000.tar"), pytest.fail):
        r = json.loads(sample["json"])
        scores = score_responses(rm, chat, r["messages"][:-1], r["replies"])
        assert scores == pytest.approx(r["scores"], abs=1e-5)
        assert r["messages"][-1]["content"] == r["replies"][best_of(scores)] and r["score"] == max(r["scores"])
        assert r["meta"]["answer"]
    (tmp_path / "out" / "sft-000001.tar").unlink()  # stopped before the second shard: resume redoes it
    run_rejection_sampling(cfg)
    assert (tmp_path / "out" / "sft-000001.tar").read_bytes() == first
    assert best_of([0.1, 0.7, 0.7, -1.0]) == 1

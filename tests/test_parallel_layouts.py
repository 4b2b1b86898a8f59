"""4D-parallel building blocks that need no process group: layout arithmetic, pipeline split, CP chunks,
data-position re-split, memory planner (against the paper's Table 4) and `params --plan`."""
import json

import pytest

from mm_llama.config import ConfigError, ModelConfig, load_config
from mm_llama.config.stage import ParallelConfig
from mm_llama.data.loader import TextLoader
from mm_llama.parallel.context_parallel import gathered_index, local_index
from mm_llama.parallel.memory import GIB, plan
from mm_llama.parallel.mesh import ParallelDims
from mm_llama.parallel.pipeline import split_layers


def test_dp_shard_fills_the_world_and_bad_products_name_the_fields():
    assert ParallelDims.resolve(ParallelConfig(tp=2, cp=2), 8) == ParallelDims(dp=2, pp=1, cp=2, tp=2)
    assert ParallelDims.resolve(ParallelConfig(dp_shard=2, pp=2), 4).world == 4
    with pytest.raises(ConfigError, match=r"tp·cp·pp = 2·1·3 = 6 does not divide the 8 ranks"):
        ParallelDims.resolve(ParallelConfig(tp=2, pp=3), 8)
    with pytest.raises(ConfigError, match=r"dp_shard·pp·cp·tp = 3·1·1·2 = 6 but WORLD_SIZE is 4"):
        ParallelDims.resolve(ParallelConfig(dp_shard=3, tp=2), 4)
    with pytest.raises(ValueError, match="dp_shard must be -1 or a positive degree"):
        ParallelConfig(dp_shard=0)


def test_pipeline_split_counts_embedding_and_output_as_layers():
    # the paper's 405B: 126 layers on 16 stages, first and last one layer short
    stages = split_layers(126, 16)
    assert [len(s) for s in stages] == [7] + [8] * 14 + [7]
    assert sum(stages, []) == list(range(126))
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(4, 3) == [[0], [1, 2], [3]]
    with pytest.raises(ConfigError, match="5 pipeline stages cannot split 2 layers"):
        split_layers(2, 5)


def test_context_parallel_chunks_balance_the_causal_work():
    # cp=2, 8 tokens in 4 chunks of 2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert local_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert gathered_index(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    work = [sum(i + 1 for i in local_index(64, 4, r).tolist()) for r in range(4)]  # keys each query attends to
    assert len(set(work)) == 1
    with pytest.raises(ConfigError, match="multiple of 2·parallel.cp = 4"):
        local_index(10, 2, 0)


def _loader(demo_data, rank, world, batch=2):
    from engine_helpers import stage
    from mm_llama.text import load_tokenizer

    cfg = stage(demo_data, demo_data / "unused", "data.shuffle=false").data
    return TextLoader(cfg, load_tokenizer(demo_data / cfg.tokenizer), seq_len=32, batch_size=batch, seed=0,
                      rank=rank, world_size=world)


def test_data_position_resplits_for_fewer_ranks_without_skipping(demo_data):
    olds = [_loader(demo_data, r, 2) for r in range(2)]
    for loader in olds:
        it = iter(loader)
        for _ in range(3):
            next(it)
    states = [o.state_dict() for o in olds]
    same = _loader(demo_data, 1, 2)
    same.load_state_dicts(states)  # same layout: exact continuation
    assert same.state_dict()["positions"] == states[1]["positions"]
    one = _loader(demo_data, 0, 1)
    one.load_state_dicts(states)
    cursors = {r: st["positions"][0]["packer"]["doc"]["cursors"]["demo_text"] for r, st in enumerate(states)}
    expected = min((e, r + 2 * s) for r, (e, s, _) in cursors.items())  # earliest global shard of any old rank
    got = one.state_dict()["positions"][0]["packer"]["doc"]["cursors"]["demo_text"]
    assert got == [expected[0], expected[1], 0]
    old_docs = sum(o.stats()["documents"] for o in olds)
    assert one.stats()["documents"] == old_docs  # counters carry over
    next(iter(one))  # and it reads on
    two_of_three = _loader(demo_data, 2, 3)
    two_of_three.load_state_dicts(states)
    got = two_of_three.state_dict()["positions"][0]["packer"]["doc"]["cursors"]["demo_text"]
    assert got == [expected[0], max(0, -(-(expected[1] - 2) // 3)), 0]
    assert two_of_three.stats()["documents"] == 0


def test_resplit_refuses_another_seed(demo_data):
    states = [_loader(demo_data, r, 2).state_dict() for r in range(2)]
    states[0]["seed"] = 7
    with pytest.raises(ValueError, match="different seed"):
        _loader(demo_data, 0, 1).load_state_dicts(states)


def _405b():
    return load_config(ModelConfig, "configs/models/llama3_1_405b.yaml", []).lm


@pytest.mark.parametrize("tp,cp,pp,dp,seq,batch", [(8, 1, 16, 64, 8192, 32), (8, 1, 16, 128, 8192, 16),
                                                    (8, 16, 16, 8, 131072, 16)])
def test_memory_plan_fits_the_papers_table_4_layouts(tp, cp, pp, dp, seq, batch):
    p = plan(_405b(), tp=tp, cp=cp, pp=pp, dp=dp, seq_len=seq, batch_per_dp=batch)
    assert 60 * GIB < p.total < 80 * GIB  # the paper ran them on 80 GB H100s without activation checkpointing
    assert p.stage == 1  # the second stage: a full 8 layers and 15 micro-batches in flight
    # 8 layers of 3.19B parameters split over TP=8, in bf16
    assert p.parameters == pytest.approx(2 * 8 * 3_187_703_808 / 8)
    assert p.optimizer == pytest.approx(2 * p.gradients)


def test_memory_plan_shows_why_405b_needs_pipelining():
    flat = plan(_405b(), tp=8, cp=1, pp=1, dp=2048, seq_len=8192, batch_per_dp=1)
    assert flat.parameters > 80 * GIB
    with pytest.raises(ValueError, match="not divisible by cp=3"):
        plan(_405b(), tp=8, cp=3, pp=16, dp=8, seq_len=8192, batch_per_dp=1)


def test_params_plan_command(capsys):
    from mm_llama.cli import main

    cmd = ["params", "configs/models/llama3_1_405b.yaml", "--plan", "--tp", "8",
           "--pp", "16", "--dp", "64", "--seq-len", "8192", "--batch-per-dp", "32"]
    assert main([*cmd, "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["plan_gib"]
    assert memory["total"] == pytest.approx(plan(_405b(), tp=8, cp=1, pp=16, dp=64, seq_len=8192, batch_per_dp=32).total / GIB)
    assert main(cmd) == 0
    text = capsys.readouterr().out
    assert "fits 80 GiB" in text and "yes" in text
    assert main([*cmd[:-2], "--cp", "3"]) != 0
    assert "--plan: seq_len 8192 is not divisible by cp=3" in capsys.readouterr().err

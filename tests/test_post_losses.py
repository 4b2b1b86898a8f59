"""DPO and reward-model objectives against hand-computed values; the RM's one-row attention; averaging."""
import math

import pytest
import torch

from mm_llama.checkpoint import CheckpointError, save_native
from mm_llama.config import ModelConfig
from mm_llama.data.dialog import IGNORE, EncodedRanking
from mm_llama.model import LlamaArgs, Transformer
from mm_llama.model.reward import RewardModel, load_reward_model
from mm_llama.post.average import average_models, average_states
from mm_llama.train.tasks.dpo import collate_pairs, dpo_terms, sequence_logps
from mm_llama.train.tasks.reward import bradley_terry_sum, collate_rankings, ranking_pairs, rewards

ARGS = LlamaArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=128)


def test_dpo_loss_matches_hand_computation():
    # rows: 0 chosen, 1 rejected; summed log-probs of the policy and the reference
    policy = torch.tensor([-1.0, -3.0])
    reference = torch.tensor([-2.0, -2.5])
    counts = torch.tensor([4, 5])
    t = dpo_terms(policy, reference, counts, torch.tensor([0]), torch.tensor([1]), beta=0.1, nll_weight=0.2)
    # chosen reward 0.1·(−1+2) = 0.1, rejected 0.1·(−3+2.5) = −0.05, margin 0.15
    # loss = −log σ(0.15) + 0.2 · (1.0 / 4) = log(1 + e^−0.15) + 0.05
    assert float(t["margin"]) == pytest.approx(0.15)
    assert float(t["chosen_reward"]) == pytest.approx(0.1)
    assert float(t["rejected_reward"]) == pytest.approx(-0.05)
    assert float(t["loss"]) == pytest.approx(0.670957, abs=1e-6)
    assert float(dpo_terms(policy, reference, counts, torch.tensor([0]), torch.tensor([1]), 0.1, 0.0)["loss"]) \
        == pytest.approx(math.log(1 + math.exp(-0.15)))


def test_sequence_logps_sum_only_labelled_tokens():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [5.0, 1.0, 1.0]]])
    labels = torch.tensor([[1, IGNORE, 0]])
    logp, count = sequence_logps(logits, labels)
    lsm = lambda row, i: row[i] - math.log(sum(math.exp(x) for x in row))  # noqa: E731
    assert float(logp[0]) == pytest.approx(lsm([1.0, 2.0, 0.0], 1) + lsm([5.0, 1.0, 1.0], 0), abs=1e-6)
    assert int(count[0]) == 2


def test_dpo_rows_leave_formatting_tokens_out():
    eot, header = 7, 8
    ex = EncodedRanking(prompt=[1, 2, header], responses=[[3, 4, eot], [5, eot]],
                        loss_masks=[[True, True, False], [True, False]], n=0)
    b = collate_pairs([ex], pad_id=0)
    assert b.tokens.tolist() == [[1, 2, header, 3, 4], [1, 2, header, 5, 0]]
    assert b.labels.tolist() == [[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, IGNORE, 5, IGNORE, IGNORE]]
    assert b.better.tolist() == [0] and b.worse.tolist() == [1]


def test_three_response_ranking_loss():
    assert ranking_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    r = torch.tensor([2.0, 1.0, 0.0])  # edited, chosen, rejected
    loss = bradley_terry_sum(r, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]))
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  −log σ(d) = softplus(−d)
    assert float(loss) == pytest.approx(sp(-1) + sp(-2) + sp(-1), abs=1e-6)
    penalised = bradley_terry_sum(r, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), logit_penalty=0.5)
    assert float(penalised - loss) == pytest.approx(0.5 * ((4 + 1) + (4 + 0) + (1 + 0)) / 2)


def _random_rm(seed=0):
    torch.manual_seed(seed)
    model = RewardModel(ARGS)
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    return model.eval()


def test_responses_in_one_row_score_as_if_alone_in_any_order():
    model = _random_rm()
    ex = EncodedRanking(prompt=[1, 2, 3, 4], responses=[[5, 6, 7], [8, 9], [10, 11, 12, 13]],
                        loss_masks=[[True] * 3, [True] * 2, [True] * 4], n=3)
    short = EncodedRanking(prompt=[1, 20], responses=[[21], [22, 23]], loss_masks=[[True], [True] * 2], n=4)
    with torch.no_grad():
        alone = [float(model(torch.tensor([ex.prompt + r]))[0, -1]) for r in ex.responses]
        for seed in (0, 1, 2, None):
            batch = collate_rankings([ex, short], pad_id=0, order_seed=seed)
            got = rewards(model, batch, "cpu").view(2, 3)
            assert got[0].tolist() == pytest.approx(alone, abs=1e-5)
            assert float(got[1, 1]) == pytest.approx(float(model(torch.tensor([[1, 20, 22, 23]]))[0, -1]), abs=1e-5)
    orders = {tuple(collate_rankings([ex], 0, s).ends[0].tolist()) for s in range(8)}
    assert len(orders) > 1  # the order in the row is random, and seeded
    batch = collate_rankings([ex, short], 0, 0)
    assert batch.better.tolist() == [0, 0, 1, 3] and batch.worse.tolist() == [1, 2, 2, 4]
    # a response never sees another: the mask row of its last token covers only the prompt and itself
    row = batch.mask[0, 0, int(batch.ends[0, 1])]
    first = int(batch.ends[0, 1]) - 1
    assert row[:4].all() and int(row.sum()) == 4 + 2 and bool(row[first])


def test_reward_model_keeps_lm_keys_and_round_trips(tmp_path):
    model = _random_rm()
    lm_keys = set(Transformer(ARGS).state_dict())
    assert set(model.state_dict()) == {f"lm.{k}" for k in lm_keys} | {"value_head.weight"}
    from mm_llama.train.checkpointing import write_model

    write_model(model, ModelConfig(name="t", lm=ARGS), tmp_path)
    loaded, _ = load_reward_model(tmp_path)
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded(tokens), model(tokens))
    lm_dir = tmp_path / "lm"
    save_native(Transformer(ARGS), ModelConfig(name="t", lm=ARGS), lm_dir)
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(lm_dir)
    # the head starts small and random (a zero head gives the LM no gradient at first), seeded
    def head():
        torch.manual_seed(7)
        return RewardModel(ARGS).value_head.weight.detach()

    heads = [head(), head()]
    torch.testing.assert_close(heads[0], heads[1])
    assert 0.5 < float(heads[0].std()) * (ARGS.dim + 1) ** 0.5 < 1.5


def test_weighted_average_and_architecture_checks(tmp_path):
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0], dtype=torch.bfloat16)}
    out = average_states([a, b], [1.0, 3.0])
    assert out["w"].tolist() == [2.5, 5.0] and out["b"].dtype == torch.bfloat16 and out["b"].item() == 3.0
    assert average_states([a, b])["w"].tolist() == [2.0, 4.0]
    with pytest.raises(CheckpointError, match="missing keys"):
        average_states([a, {"w": b["w"]}], names=["x", "y"])
    with pytest.raises(ValueError, match="weights"):
        average_states([a, b], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        average_states([a, b], [1.0, -1.0])
    torch.manual_seed(0)
    m1, m2 = Transformer(ARGS), Transformer(ARGS)
    save_native(m1, ModelConfig(name="a", lm=ARGS), tmp_path / "a")
    save_native(m2, ModelConfig(name="b", lm=ARGS), tmp_path / "b")
    state, config = average_models([tmp_path / "a", tmp_path / "b"], out=tmp_path / "avg")
    key = "layers.0.attention.wq.weight"
    torch.testing.assert_close(state[key], (m1.state_dict()[key] + m2.state_dict()[key]) / 2)
    assert (tmp_path / "avg" / "model.safetensors").is_file()
    other = ARGS.model_copy(update={"n_layers": 1})
    save_native(Transformer(other), ModelConfig(name="c", lm=other), tmp_path / "c")
    with pytest.raises(CheckpointError, match="another architecture"):
        average_models([tmp_path / "a", tmp_path / "c"])

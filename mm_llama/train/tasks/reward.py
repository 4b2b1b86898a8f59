"""The reward model (SPEC §3.2): Bradley–Terry ranking loss without a margin, 2–3 responses in one row.

The prompt and its responses are concatenated into one row in random order (paper §4.2.1). Each
response attends to the prompt and to itself only, and its positions continue from the prompt's end,
so its reward is exactly the one it would get alone in a row after the prompt. A ranking
r₀ > r₁ (> r₂) gives one loss term per ordered pair: −log σ(r_better − r_worse); the pair is the loss unit.
`logit_penalty` w adds w·(r_better² + r_worse²)/2 per pair: the vision RM's penalty on squared reward
logits (paper §7.5.3), averaged over the batch by the engine's division by the pair count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from ...data.dialog import EncodedRanking, PreferenceLoader, example_rng, heldout_records
from ...model.reward import RewardModel, is_reward_state
from .base import register
from .post_base import PostTask, PreferenceOptions
from .sft import lm_from_state

PAD_SEGMENT = -1


class RewardOptions(PreferenceOptions):
    logit_penalty: float = Field(0.0, ge=0, description="weight of the squared-reward-logit penalty (vision RM)")


@dataclass
class RewardBatch:
    """Rows of prompt + responses. tokens, positions `[batch, seq]`; mask bool `[batch, 1, seq, seq]`;
    ends `[batch, max_responses]` (index of each response's last token, ranking order, -1: none);
    better, worse `[pairs]`: flat indices into `ends` of each pair's better and worse response."""

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    ends: torch.Tensor
    better: torch.Tensor
    worse: torch.Tensor


def ranking_pairs(n: int) -> list[tuple[int, int]]:
    """(better, worse) for every pair of a ranking of n responses listed best first."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def response_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments `[batch, seq]` (0 prompt, k response k, -1 padding) → bool `[batch, 1, seq, seq]`.

    Query i sees key j iff j <= i and (j is in the prompt or in i's own segment); padding sees itself only.
    """
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal & ((k == 0) | (k == q)) & (q != PAD_SEGMENT)
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)
    return allowed[:, None]


def collate_rankings(examples: list[EncodedRanking], pad_id: int, order_seed: int | None, rank: int = 0) -> RewardBatch:
    """One row per ranking; responses in random order drawn from (`order_seed`, rank, example) or as ranked."""
    rows, positions, segments, ends, better, worse = [], [], [], [], [], []
    width = max(len(e.responses) for e in examples)
    for b, e in enumerate(examples):
        order = list(range(len(e.responses)))
        if order_seed is not None:
            example_rng(order_seed, rank, e.n).shuffle(order)
        tok, pos, seg = list(e.prompt), list(range(len(e.prompt))), [0] * len(e.prompt)
        end = [-1] * width
        for k in order:
            r = e.responses[k]
            tok += r
            pos += range(len(e.prompt), len(e.prompt) + len(r))
            seg += [k + 1] * len(r)
            end[k] = len(tok) - 1
        rows.append(tok), positions.append(pos), segments.append(seg), ends.append(end)
        for i, j in ranking_pairs(len(e.responses)):
            better.append(b * width + i)
            worse.append(b * width + j)
    t = max(map(len, rows))
    pad = lambda xs, v: torch.tensor([x + [v] * (t - len(x)) for x in xs], dtype=torch.long)  # noqa: E731
    seg = pad(segments, PAD_SEGMENT)
    return RewardBatch(pad(rows, pad_id), pad(positions, 0), response_mask(seg), torch.tensor(ends),
                       torch.tensor(better), torch.tensor(worse))


def rewards(model: RewardModel, batch: RewardBatch, device) -> torch.Tensor:
    """Reward of every response, `[batch · max_responses]` (entries without a response are 0)."""
    logits = model(batch.tokens.to(device), mask=batch.mask.to(device), positions=batch.positions.to(device))
    ends = batch.ends.to(device)
    picked = logits.gather(1, ends.clamp(min=0))
    return torch.where(ends >= 0, picked, torch.zeros_like(picked)).flatten()


def bradley_terry_sum(r: torch.Tensor, better: torch.Tensor, worse: torch.Tensor, logit_penalty: float = 0.0) -> torch.Tensor:
    """Σ over pairs of −log σ(r_better − r_worse) [+ penalty·(r_better² + r_worse²)/2]."""
    rb, rw = r[better], r[worse]
    loss = F.softplus(rw - rb).sum()  # softplus(−x) = −log σ(x), stable for large |x|
    if logit_penalty:
        loss = loss + logit_penalty * (rb.square() + rw.square()).sum() / 2
    return loss


@register("reward_model")
class RewardModelTask(PostTask):
    option_schema = RewardOptions

    def build_model(self):
        state = self.start_state()
        if state is not None and is_reward_state(state):  # continuing (or averaging) reward models
            model = RewardModel(self.cfg.model.lm)
            model.load_state_dict(state)
            return model
        return RewardModel(lm_from_state(self.cfg.model.lm, state, self.cfg.run.seed))

    def _loader(self, seq_len, batch_size, rank, world_size, seed):
        return PreferenceLoader(self.cfg.data, seed, rank, world_size, chat=self.chat, batch_size=batch_size,
                                max_tokens=seq_len, strengths=tuple(self.opts.strengths), concatenated=True)

    def loader(self, seq_len, batch_size, rank, world_size):
        seed = self.cfg.run.seed
        loader = self._loader(seq_len, batch_size, rank, world_size, seed)
        loader.collate = lambda ex: collate_rankings(ex, self.chat.tokenizer.pad_id, seed, rank)
        return loader

    def count(self, batch) -> int:
        return int(batch.better.numel())

    def loss(self, model, batch, device) -> torch.Tensor:
        return bradley_terry_sum(rewards(model, batch, device), batch.better.to(device), batch.worse.to(device),
                                 self.opts.logit_penalty)

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        enc = self._loader(seq_len, batch_size, 0, 1, self.cfg.run.seed).encode
        examples = heldout_records(self.cfg.data, enc, self.cfg.train.eval_batches * batch_size)
        pad, seed = self.chat.tokenizer.pad_id, self.cfg.run.seed
        return [collate_rankings(examples[i:i + batch_size], pad, seed) for i in range(0, len(examples), batch_size)]

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        """`val_loss` per pair; `val_accuracy`: pairs ranked right; `val_accuracy_chosen_rejected`: the same
        over 2-response rankings (chosen vs rejected); `val_reward_mean`, `val_reward_sq`: logit scale."""
        was_training = model.training
        model.eval()
        loss = right = pairs = two_right = two = 0.0
        total = sq = n = 0.0
        with torch.no_grad():
            for b in batches:
                with autocast():
                    r = rewards(model, b, device).float()
                better, worse = b.better.to(device), b.worse.to(device)
                loss += float(bradley_terry_sum(r, better, worse))
                ok = (r[better] > r[worse]).float()
                right, pairs = right + float(ok.sum()), pairs + ok.numel()
                sizes = (b.ends >= 0).sum(1).to(device)
                is_two = sizes[better // b.ends.shape[1]] == 2
                two_right, two = two_right + float(ok[is_two].sum()), two + int(is_two.sum())
                valid = (b.ends >= 0).flatten().to(device)
                total, sq, n = total + float(r[valid].sum()), sq + float(r[valid].square().sum()), n + int(valid.sum())
        model.train(was_training)
        return {"val_loss": loss / max(pairs, 1), "val_accuracy": right / max(pairs, 1),
                "val_accuracy_chosen_rejected": two_right / max(two, 1), "val_reward_mean": total / max(n, 1),
                "val_reward_sq": sq / max(n, 1)}

"""The reward model (SPEC §3.2): Bradley–Terry ranking loss without a margin, 2–3 responses in one row.

The prompt and its responses are concatenated into one row in random order (paper §4.2.1). Each
response attends to the prompt and to itself only, and its positions continue from the prompt's end,
so its reward is exactly the one it would get alone in a row after the prompt. A ranking
r₀ > r₁ (> r₂) gives one loss term per ordered pair: −log σ(r_better − r_worse); the pair is the loss unit.
`logit_penalty` w adds w·(r_better² + r_worse²)/2 per pair: the vision RM's penalty on squared reward
logits (paper §7.5.3), averaged over the batch by the engine's division by the pair count.
Under pipeline parallelism (text RM, `parallel.pipeline.RewardStage`) a ranking is one row of a micro-batch and the
last stage, which holds the value head, computes its pairs' loss (`pipeline_loss`).

With a `model.vision` section the task trains the vision RM (`VisionRewardModel`): `init.from` is the
composed image–text model (or a vision RM to continue), `train.options.language_rm` the language RM
whose weights replace the LM and value head (paper: self-attention initialised from the language RM
and frozen — the stage's `train.trainable` names the vision encoder and cross-attention). Rankings
then carry their prompt's images (members of the same sample, `mm_llama.data.dialog`); text-only
rankings still train (their rows have no image and skip cross-attention).

There is no speech or video reward model: a stage whose model has a `speech:` or `video:` section is refused,
and a ranking holding an audio or video part stops the stage with an error naming the part type (it would
otherwise be skipped, and a data set of such rankings would train on nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field

from ...config import ConfigError
from ...data.dialog import EncodedRanking, PreferenceLoader, example_rng, heldout_records, stack_media
from ...model.reward import RewardModel, VisionRewardModel, is_reward_state
from .base import register
from .post_base import PostTask, PreferenceOptions
from .post_base import lm_from_state

PAD_SEGMENT = -1


class RewardOptions(PreferenceOptions):
    logit_penalty: float = Field(0.0, ge=0, description="weight of the squared-reward-logit penalty (vision RM)")
    language_rm: str | None = Field(None, description="vision RM: the language RM whose LM and value head it takes")


@dataclass
class RewardBatch:
    """Rows of prompt + responses. tokens, positions `[batch, seq]`; mask bool `[batch, 1, seq, seq]`;
    ends `[batch, max_responses]` (index of each response's last token, ranking order, -1: none);
    better, worse `[pairs]`: flat indices into `ends` of each pair's better and worse response;
    images `[batch, n_images, tiles, 3, S, S]`, aspect_ratios `[batch, n_images, 2]` or None (no image)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    ends: torch.Tensor
    better: torch.Tensor
    worse: torch.Tensor
    images: torch.Tensor | None = None
    aspect_ratios: torch.Tensor | None = None


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


def collate_rankings(examples: list[EncodedRanking], pad_id: int, order_seed: int | None, rank: int = 0,
                     max_tiles: int = 0) -> RewardBatch:
    """One row per ranking; responses in random order drawn from (`order_seed`, rank, example) or as ranked;
    the prompts' images (if any) stacked with `max_tiles` tile slots."""
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
    images, ratios = stack_media(examples, max_tiles) if max_tiles else (None, None)
    return RewardBatch(pad(rows, pad_id), pad(positions, 0), response_mask(seg), torch.tensor(ends),
                       torch.tensor(better), torch.tensor(worse), images, ratios)


def rewards(model: RewardModel | VisionRewardModel, batch: RewardBatch, device) -> torch.Tensor:
    """Reward of every response, `[batch · max_responses]` (entries without a response are 0)."""
    media = {}
    if batch.images is not None:
        media = {"images": batch.images.to(device), "aspect_ratios": batch.aspect_ratios.to(device)}
    logits = model(batch.tokens.to(device), mask=batch.mask.to(device), positions=batch.positions.to(device), **media)
    return response_rewards(logits, batch.ends.to(device))


def response_rewards(logits: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Reward logits per token `[batch, seq]`, ends `[batch, max_responses]` → the reward of every response
    `[batch · max_responses]` (0 where there is none)."""
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

    def __init__(self, cfg):
        super().__init__(cfg)
        for section in ("speech", "video"):
            if getattr(cfg.model, section) is not None:
                raise ConfigError(f"stage '{cfg.name}': the reward_model objective has no {section} reward model; "
                                  f"rankings with {'audio' if section == 'speech' else 'video'} parts are not "
                                  f"supported (remove model.{section})")
        if self.opts.language_rm is not None and cfg.model.vision is None:
            raise ConfigError(f"stage '{cfg.name}': train.options.language_rm is for a vision RM (a model with a "
                              "vision: section)")

    def build_model(self):
        if self.cfg.model.vision is not None:
            return self._vision_model()
        state = self.start_state()
        if state is not None and is_reward_state(state):  # continuing (or averaging) reward models
            model = RewardModel(self.cfg.model.lm)
            model.load_state_dict(state)
            return model
        return RewardModel(lm_from_state(self.cfg.model.lm, state, self.cfg.run.seed))

    def _vision_model(self) -> VisionRewardModel:
        """Vision parts from `init.from` (a composed model or vision RM), LM + head from `language_rm`."""
        from ...post.average import read_model
        from .vision_lm import resize_positions

        torch.manual_seed(self.cfg.run.seed)
        model = VisionRewardModel(self.cfg.model.lm, self.cfg.model.vision)
        expected = model.state_dict()
        loaded: set[str] = set()
        for what, path, keep in (("init.from", self.cfg.init.from_, lambda k: True),
                                 ("train.options.language_rm", self.opts.language_rm,
                                  lambda k: k.startswith("lm.") or k == "value_head.weight")):
            if path is None:
                continue
            state = self.start_state() if what == "init.from" else read_model(path)[0]
            state = {k: v for k, v in resize_positions(state, "vision.", model.vision.args.grid).items() if keep(k)}
            wrong = sorted(k for k in state if k not in expected or state[k].shape != expected[k].shape)
            if wrong:
                raise ConfigError(f"{what} {path}: does not fit the vision RM (unknown keys or other shapes: "
                                  f"{wrong[:4]})")
            model.load_state_dict(state, strict=False)
            loaded |= state.keys()
        missing = sorted(k for k in expected.keys() - loaded if not k.startswith("value_head"))
        if self.cfg.init.from_ is not None and missing:
            raise ConfigError(f"init.from {self.cfg.init.from_}: lacks {missing[:4]} (expected a composed "
                              "image-text model or a vision RM)")
        if self.cfg.init.from_ is not None and "value_head.weight" not in loaded:
            raise ConfigError(f"stage '{self.cfg.name}': a vision RM needs train.options.language_rm (the language "
                              "RM) unless init.from is a vision RM")
        return model

    def _loader(self, seq_len, batch_size, rank, world_size, seed):
        return PreferenceLoader(self.cfg.data, seed, rank, world_size, chat=self.chat, batch_size=batch_size,
                                max_tokens=seq_len, strengths=tuple(self.opts.strengths), concatenated=True,
                                decode_media=self.media_parts(refuse=("audio", "video")))

    def loader(self, seq_len, batch_size, rank, world_size):
        seed = self.cfg.run.seed
        loader = self._loader(seq_len, batch_size, rank, world_size, seed)
        loader.collate = lambda ex: collate_rankings(ex, self.chat.tokenizer.pad_id, seed, rank, self.max_tiles)
        return loader

    def count(self, batch) -> int:
        return int(batch.better.numel())

    def loss(self, model, batch, device) -> torch.Tensor:
        return bradley_terry_sum(rewards(model, batch, device), batch.better.to(device), batch.worse.to(device),
                                 self.opts.logit_penalty)

    def pipeline_batch(self, batch: RewardBatch, rows: int, device) -> RewardBatch:
        """`batch` as pipeline parallelism runs it: unchanged (a ranking is one row; `pipeline.RewardStage` pads)."""
        return batch

    def pipeline_loss(self, logits: torch.Tensor, rows: torch.Tensor, batch: RewardBatch) -> torch.Tensor:
        """The loss of one pipeline micro-batch: reward logits per token `[m, seq]` of the consecutive rows `rows`
        `[m]` of `batch` padded (`pipeline.RewardStage`; rows past the batch are padding) → the summed loss of the
        pairs of those rows' rankings (a ranking is one row)."""
        width, first = batch.ends.shape[1], int(rows[0])
        ends = batch.ends[first:first + len(rows)].to(logits.device)
        r = response_rewards(logits[:len(ends)], ends)
        better, worse = batch.better.to(logits.device), batch.worse.to(logits.device)
        mine = (better // width >= first) & (better // width < first + len(rows))
        return bradley_terry_sum(r, better[mine] - first * width, worse[mine] - first * width, self.opts.logit_penalty)

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        enc = self._loader(seq_len, batch_size, 0, 1, self.cfg.run.seed).encode
        examples = heldout_records(self.cfg.data, enc, self.cfg.train.eval_batches * batch_size)
        pad, seed = self.chat.tokenizer.pad_id, self.cfg.run.seed
        return [collate_rankings(examples[i:i + batch_size], pad, seed, 0, self.max_tiles)
                for i in range(0, len(examples), batch_size)]

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

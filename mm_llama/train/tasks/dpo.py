"""Direct preference optimisation (SPEC §3.4) with the paper's changes.

Per (better y_w, worse y_l) pair of a ranking, with log-probs summed over the response's tokens:

    loss = −log σ(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])
           + α · (−log π(y_best) / |y_best|)

β (paper 0.1) and α, the NLL regularisation on the chosen response (paper 0.2, after Pang et al. 2024,
whose NLL term is per token), are options. In a ranking edited > chosen > rejected the NLL term of
every pair is on the ranking's best response (`nll_on: best`, our reading): putting it on each pair's
better one (`nll_on: better`) also raises the hedged middle answer, which then outranks the edited one
(measured on the demo: held-out edited-vs-chosen implicit-reward accuracy 0.20). Header and termination
tokens (`<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`, `<|eom_id|>`) are left out of every
log-prob: they appear in both responses and, kept in, push the model to repeat or cut its tails. The
reference log-probs come from a frozen copy of the starting model (`reference: model`), or from the
records (`reference: stored`, field `reference_logps` written by `store_reference_logps`). Under
torchrun the parallel runtime sets `frozen_layout`, and the reference is laid out like the policy
(`parallel.fsdp.shard_frozen`: the same TP plan, FSDP per block, no gradients), so it costs 1/dp of its
memory per rank. Under pipeline parallelism (text DPO) the reference is cut into the policy's stages and a
forward-only pass of its pipeline gives the batch's reference log-probs before each policy step
(`pipeline_batch`, which also gives every ranking three rows so that a micro-batch holds whole rankings); the last
stage computes each micro-batch's pair losses (`pipeline_loss`).
`reference_ema: {every: k, decay: d}`
updates the training reference by EMA every k optimizer steps (the paper's vision DPO; k UNCONFIRMED,
see `mm_llama.post.ema`); its weights ride in the data-loader state of each checkpoint, so a resumed
run continues exactly. Metrics, always against the *starting* reference (so "does the policy now
prefer the better answer" keeps one meaning with or without EMA): the implicit reward
β·(log π − log π_ref) of the better and worse responses, their margin, and how often it is positive.

Vision DPO (SPEC §4.2): with a `model.vision` section policy and reference are composed image–text
models; each response row carries its prompt's images, so every log-prob is computed with them. The
paper trains the adapters (the stage's `train.trainable`) and moves the reference by EMA. The same holds
for videos (a `model.video` section too) and audio (a `model.speech` section: `SpeechLM`, each row's
prompt clips spliced over its `<|speech|>` spans).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ...config import ConfigError
from ...data.dialog import IGNORE, EncodedRanking, PreferenceLoader, collate_media, heldout_records, sample_record
from ...data.shards import TAR_MTIME, read_shard, source_shards
from ...data.accounting import Counters
from ...data.text_stream import SkipSample
from ...post.ema import EMAReference
from .base import register
from .post_base import PostTask, PreferenceOptions, lm_blocks
from .reward import ranking_pairs


class EMAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every: int = Field(..., ge=1, description="optimizer steps between reference updates (paper: k, UNCONFIRMED)")
    decay: float = Field(..., ge=0, lt=1, description="ref <- decay*ref + (1-decay)*policy")


class DPOOptions(PreferenceOptions):
    beta: float = Field(0.1, gt=0)
    nll_weight: float = Field(0.2, ge=0, description="NLL on the chosen response, per token")
    nll_on: Literal["best", "better"] = Field("best", description="NLL on each ranking's best response, or on "
                                              "each pair's better one")
    reference: Literal["model", "stored"] = "model"
    reference_from: str | None = Field(None, description="the reference model (default: the starting model)")
    reference_ema: EMAOptions | None = Field(None, description="update the reference by EMA (vision DPO)")
    mask_formatting: bool = Field(True, description="leave header and termination tokens out of the loss")

    @model_validator(mode="after")
    def _ema_needs_model(self):
        if self.reference_ema is not None and self.reference == "stored":
            raise ValueError("reference_ema updates a reference model; it cannot be used with reference: stored")
        return self


# the most responses a ranking holds (`data.dialog`: 2 or 3). Under pipeline parallelism every ranking gets as many
# rows (`slot_rankings`), so a micro-batch of whole rankings holds the rows of all its pairs.
RESPONSES_PER_RANKING = 3

MEDIA_INPUTS = ("images", "aspect_ratios", "videos", "video_aspect_ratios", "frame_mask", "speech_feats",
                "speech_lengths")


@dataclass
class PairBatch:
    """One row per response: tokens, labels `[rows, seq]` (labels -100 outside the response's counted
    tokens); better, worse, best `[pairs]` row indices (best: the pair's ranking's first response);
    reference `[rows]` stored log-probs or None (pipelined: the reference's, `DPO.pipeline_batch`); index: the
    batch's number in its loader (None: held out).
    Each row's prompt's media (None when the batch has none of a kind; shapes of `dialog.collate_media`):
    images `[rows, n_images, tiles, 3, S, S]`, aspect_ratios `[rows, n_images, 2]`; videos
    `[rows, n_videos, frames, tiles, 3, S, S]`, video_aspect_ratios `[rows, n_videos, frames, 2]`, frame_mask
    `[rows, n_videos, frames]`; speech_feats `[n_clips, frames, n_mels]`, speech_lengths `[n_clips]` (row order)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    better: torch.Tensor
    worse: torch.Tensor
    best: torch.Tensor
    reference: torch.Tensor | None = None
    index: int | None = None
    images: torch.Tensor | None = None
    aspect_ratios: torch.Tensor | None = None
    videos: torch.Tensor | None = None
    video_aspect_ratios: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    speech_feats: torch.Tensor | None = None
    speech_lengths: torch.Tensor | None = None

    def media_inputs(self, device) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for this batch's media (none for a text batch)."""
        return {k: getattr(self, k).to(device) for k in MEDIA_INPUTS if getattr(self, k) is not None}


def collate_pairs(examples: list[EncodedRanking], pad_id: int, max_tiles: int = 0, frames_per_group: int = 1
                  ) -> PairBatch:
    """prompt + response per row, right-padded to the longest row; each row also holds its prompt's media
    (images and videos with `max_tiles` tile slots, video frames padded to a multiple of `frames_per_group`)."""
    rows, labels, better, worse, best, reference = [], [], [], [], [], []
    stored = all(e.reference_logps is not None for e in examples)
    for e in examples:
        first = len(rows)
        for r, m in zip(e.responses, e.loss_masks):
            seq = e.prompt + r
            rows.append(seq[:-1])
            # label at t predicts token t+1: counted only where that token is a counted response token
            labels.append([IGNORE] * (len(e.prompt) - 1) + [t if keep else IGNORE for t, keep in zip(r, m)])
        for i, j in ranking_pairs(len(e.responses)):
            better.append(first + i)
            worse.append(first + j)
            best.append(first)
        if stored:
            reference += list(e.reference_logps)
    t = max(map(len, rows))
    pad = lambda xs, v: torch.tensor([x + [v] * (t - len(x)) for x in xs], dtype=torch.long)  # noqa: E731
    media = collate_media([[(0, m) for m in e.media] for e in examples for _ in e.responses], max_tiles,
                          frames_per_group)
    return PairBatch(pad(rows, pad_id), pad(labels, IGNORE), torch.tensor(better), torch.tensor(worse),
                     torch.tensor(best), torch.tensor(reference, dtype=torch.float64) if stored else None,
                     **{k: v for k, v in media.items() if k in MEDIA_INPUTS})


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits `[rows, seq, vocab]`, labels `[rows, seq]` → (Σ log p of labelled tokens `[rows]`, their count `[rows]`)."""
    keep = labels != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * keep).sum(-1), keep.sum(-1)


def labelled_logps(model, tokens: torch.Tensor, labels: torch.Tensor, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logps(model(tokens, **inputs), labels)` with logits computed only at the labelled (response)
    positions, through the model's `logits_at`; a pipelined model computes them itself (`model.labelled_logps`)."""
    if hasattr(model, "labelled_logps"):
        return model.labelled_logps(tokens, labels, **inputs)
    keep = labels != IGNORE
    logits = model(tokens, logits_at=keep, **inputs).float()
    logp = torch.log_softmax(logits, -1).gather(-1, labels[keep][:, None]).squeeze(-1)
    rows = torch.zeros(labels.shape[0], dtype=logp.dtype, device=logp.device)
    return rows.index_add(0, keep.nonzero()[:, 0], logp), keep.sum(-1)


def dpo_terms(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, better: torch.Tensor,
              worse: torch.Tensor, beta: float, nll_weight: float, nll_rows: torch.Tensor | None = None
              ) -> dict[str, torch.Tensor]:
    """Per pair: `loss`, `chosen_reward`, `rejected_reward`, `margin` from per-row log-probs `[rows]`.

    `nll_rows` `[pairs]`: the row whose per-token NLL each pair adds (default: the pair's better row)."""
    chosen = beta * (policy[better] - reference[better])
    rejected = beta * (policy[worse] - reference[worse])
    margin = chosen - rejected
    loss = -torch.nn.functional.logsigmoid(margin)
    if nll_weight:
        rows = better if nll_rows is None else nll_rows
        loss = loss + nll_weight * (-policy[rows] / counts[rows].clamp(min=1))
    return {"loss": loss, "chosen_reward": chosen.detach(), "rejected_reward": rejected.detach(),
            "margin": margin.detach()}


def slot_rankings(batch: PairBatch, rankings: int, pad_id: int) -> PairBatch:
    """A text batch with the rows of its k-th ranking moved to rows 3k, 3k+1 (, 3k+2) of `rankings` · 3 rows; a
    missing response (of a 2-response ranking, or of a ranking past the batch) is a row of `pad_id` without
    labels. Pairs, best rows and stored reference log-probs follow their rows."""
    n, t = batch.tokens.shape
    firsts = batch.best.unique()  # sorted: the first row of every ranking (each has a pair)
    if len(firsts) > rankings:
        raise ValueError(f"a batch of {len(firsts)} rankings does not fit the pipeline's train.micro_batch ({rankings})")
    ranking = torch.searchsorted(firsts, torch.arange(n), right=True) - 1
    slot = ranking * RESPONSES_PER_RANKING + torch.arange(n) - firsts[ranking]
    rows = rankings * RESPONSES_PER_RANKING
    tokens = batch.tokens.new_full((rows, t), pad_id).index_copy(0, slot, batch.tokens)
    labels = batch.labels.new_full((rows, t), IGNORE).index_copy(0, slot, batch.labels)
    reference = None
    if batch.reference is not None:
        reference = batch.reference.new_zeros(rows).index_copy(0, slot, batch.reference)
    return PairBatch(tokens, labels, slot[batch.better], slot[batch.worse], slot[batch.best], reference, batch.index)


class NumberedBatches:
    """A preference loader whose batches carry their number (`PairBatch.index`), so the task knows the
    optimizer step (batch number // grad_accum) without an engine hook; with an EMA reference its
    state also holds the reference's weights (the engine saves the loader state in every checkpoint)."""

    def __init__(self, loader: PreferenceLoader, ema: EMAReference | None = None):
        self.loader, self.ema, self.delivered = loader, ema, 0

    def __iter__(self):
        for batch in self.loader:
            batch.index = self.delivered
            self.delivered += 1
            yield batch

    def stats(self) -> dict:
        return self.loader.stats()

    def state_dict(self) -> dict:
        state = {"loader": self.loader.state_dict(), "delivered": self.delivered}
        if self.ema is not None:
            state["reference_ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "loader" not in state:
            raise ValueError("not a DPO loader state (expected 'loader' and 'delivered')")
        if (self.ema is not None) != ("reference_ema" in state):
            raise ValueError("the checkpoint was written with a different train.options.reference_ema setting")
        self.loader.load_state_dict(state["loader"])
        self.delivered = int(state["delivered"])
        if self.ema is not None:
            self.ema.load_state_dict(state["reference_ema"])

    def load_state_dicts(self, states: list[dict]) -> None:
        """The states of all data-parallel ranks: the preference loader continues or re-splits them itself; every
        rank delivers as many batches, so the batch number (and the EMA reference) is the first rank's."""
        if not isinstance(states, list) or not states or not all(isinstance(x, dict) and "loader" in x for x in states):
            raise ValueError("not DPO loader states (expected a list of dicts with 'loader' and 'delivered')")
        if (self.ema is not None) != ("reference_ema" in states[0]):
            raise ValueError("the checkpoint was written with a different train.options.reference_ema setting")
        self.loader.load_state_dicts([x["loader"] for x in states])
        self.delivered = int(states[0]["delivered"])
        if self.ema is not None:
            self.ema.load_state_dict(states[0]["reference_ema"])


@register("dpo")
class DPO(PostTask):
    option_schema = DPOOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.opts.reference == "model" and cfg.init.from_ is None and self.opts.reference_from is None:
            raise ConfigError(f"stage '{cfg.name}': DPO needs a reference model: set init.from (the SFT model) or "
                              "train.options.reference_from")
        if self.opts.reference_ema is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"stage '{cfg.name}': train.options.reference_ema runs single-process only (the EMA "
                              "copy is not sharded with the policy)")
        if self.opts.reference_ema is not None and cfg.train.ramp:
            raise ConfigError(f"stage '{cfg.name}': train.options.reference_ema counts optimizer steps from batches "
                              "and needs a fixed grad_accum (no train.ramp)")
        self._reference = None
        self._ema = None
        # set by the parallel runtime: lays a frozen model out like the policy (None: one process, kept whole)
        self.frozen_layout = None

    def build_model(self):
        return self.model_from_state(self.start_state())

    def blocks(self, model):
        return lm_blocks(model)

    def _reference_source(self) -> str | None:
        return self.opts.reference_from or self.cfg.init.from_

    def _reference_state(self) -> dict:
        if self.opts.reference_from is not None:
            from ...post.average import read_model

            return read_model(self.opts.reference_from)[0]
        return self.start_state()

    def reference_model(self, device):
        """The frozen starting reference: `reference_from`, else a copy of the starting weights (loaded again);
        built on first use, on every rank at once under torchrun (its layout shards it over the ranks)."""
        if self._reference is None:
            ref = self.model_from_state(self._reference_state(), self._reference_source())
            ref = ref.to(device=device).requires_grad_(False).eval()
            self._reference = ref if self.frozen_layout is None else self.frozen_layout(ref)
        return self._reference

    @property
    def ema(self):
        """The EMA-updated training reference (`reference_ema`), starting as the starting reference; else None."""
        if self.opts.reference_ema is not None and self._ema is None:
            from ...post.ema import EMAReference

            model = self.model_from_state(self._reference_state(), self._reference_source())
            self._ema = EMAReference(model, self.opts.reference_ema.every, self.opts.reference_ema.decay)
        return self._ema

    def _loader(self, seq_len, batch_size, rank, world_size):
        return PreferenceLoader(self.cfg.data, self.cfg.run.seed, rank, world_size, chat=self.chat,
                                batch_size=batch_size, max_tokens=seq_len + 1, strengths=tuple(self.opts.strengths),
                                mask_formatting=self.opts.mask_formatting, decode_media=self.media_parts())

    def loader(self, seq_len, batch_size, rank, world_size):
        loader = self._loader(seq_len, batch_size, rank, world_size)
        pad = self.chat.tokenizer.pad_id
        loader.collate = lambda ex: collate_pairs(ex, pad, self.max_tiles, self.frames_per_group)
        return NumberedBatches(loader, self.ema)

    def count(self, batch) -> int:
        return int(batch.better.numel())

    def reference_logps(self, batch, device, reference_model=None) -> torch.Tensor:
        """Log-probs `[rows]` of the responses under `reference_model`, the stored ones, or the starting model."""
        if reference_model is None and self.opts.reference == "stored":
            if batch.reference is None:
                raise ValueError("train.options.reference is 'stored' but a record has no 'reference_logps' "
                                 "(write them with mm_llama.train.tasks.dpo.store_reference_logps)")
            return batch.reference.to(device=device)
        with torch.no_grad():
            tokens, labels, media = batch.tokens.to(device), batch.labels.to(device), batch.media_inputs(device)
            return labelled_logps(reference_model or self.reference_model(device), tokens, labels, **media)[0]

    def terms(self, model, batch, device, reference_model=None) -> dict[str, torch.Tensor]:
        """DPO terms per pair; the reference is `reference_model`, the stored log-probs, or the starting model."""
        tokens, labels, media = batch.tokens.to(device), batch.labels.to(device), batch.media_inputs(device)
        policy, counts = labelled_logps(model, tokens, labels, **media)
        reference = self.reference_logps(batch, device, reference_model).to(policy.dtype)
        nll_rows = batch.best.to(device) if self.opts.nll_on == "best" else None
        return dpo_terms(policy, reference, counts, batch.better.to(device), batch.worse.to(device),
                         self.opts.beta, self.opts.nll_weight, nll_rows)

    def loss(self, model, batch, device) -> torch.Tensor:
        reference = None
        if self.ema is not None:
            if batch.index is None:
                raise ValueError("an EMA-reference DPO batch needs its number (PairBatch.index) to know the step")
            self.ema.model.to(device)
            self.ema.step(model, batch.index // self.cfg.train.grad_accum)
            reference = self.ema.model
        return self.terms(model, batch, device, reference)["loss"].sum()

    # pipeline parallelism (`parallel.runtime`): the rows of a ranking in the pipeline's fixed batch
    pipeline_rows = RESPONSES_PER_RANKING

    def pipeline_batch(self, batch: PairBatch, rows: int, device) -> PairBatch:
        """`batch` laid out in the pipeline's `rows` rows (`slot_rankings`), with the reference log-probs of every
        row (`reference`: stored, or from a forward pass of the pipelined reference model)."""
        if batch.media_inputs("cpu"):
            raise ValueError("a pipelined DPO batch holds media; parallel.pp cuts the text DPO only")
        slotted = slot_rankings(batch, rows // RESPONSES_PER_RANKING, self.chat.tokenizer.pad_id)
        slotted.reference = self.reference_logps(slotted, device)
        return slotted

    def pipeline_loss(self, logits: torch.Tensor, rows: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        """The loss of one pipeline micro-batch: logits `[m, seq, vocab]` of the consecutive rows `rows` `[m]` of a
        `pipeline_batch` (whole rankings) → the summed loss of their pairs."""
        first, device = int(rows[0]), logits.device
        policy, counts = sequence_logps(logits, batch.labels[first:first + len(rows)].to(device))
        reference = batch.reference[first:first + len(rows)].to(device=device, dtype=policy.dtype)
        better, worse, best = (getattr(batch, k).to(device) for k in ("better", "worse", "best"))
        mine = (better >= first) & (better < first + len(rows))
        nll_rows = best[mine] - first if self.opts.nll_on == "best" else None
        return dpo_terms(policy, reference, counts, better[mine] - first, worse[mine] - first, self.opts.beta,
                         self.opts.nll_weight, nll_rows)["loss"].sum()

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        enc = self._loader(seq_len, batch_size, 0, 1).encode
        examples = heldout_records(self.cfg.data, enc, self.cfg.train.eval_batches * batch_size)
        pad = self.chat.tokenizer.pad_id
        return [collate_pairs(examples[i:i + batch_size], pad, self.max_tiles, self.frames_per_group)
                for i in range(0, len(examples), batch_size)]

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        """`val_loss` per pair, `val_reward_accuracy` (better response's implicit reward higher),
        `val_reward_margin`, `val_chosen_reward`, `val_rejected_reward` (means over pairs); all against the
        starting reference (or the stored log-probs), also when training uses an EMA reference."""
        was_training = model.training
        model.eval()
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}
        pairs = 0
        with torch.no_grad():
            for b in batches:
                with autocast():
                    t = self.terms(model, b, device)
                sums["loss"] += float(t["loss"].sum())
                sums["accuracy"] += float((t["margin"] > 0).sum())
                for k in ("margin", "chosen_reward", "rejected_reward"):
                    sums[k] += float(t[k].sum())
                pairs += t["margin"].numel()
        model.train(was_training)
        names = {"loss": "val_loss", "accuracy": "val_reward_accuracy", "margin": "val_reward_margin",
                 "chosen_reward": "val_chosen_reward", "rejected_reward": "val_rejected_reward"}
        return {names[k]: v / max(pairs, 1) for k, v in sums.items()}


@torch.no_grad()
def store_reference_logps(task: DPO, out_dir: str | Path, device: str = "cpu") -> list[Path]:
    """Copy the training sources' records to `out_dir/<source>/NNNNNN.tar` with `reference_logps` added,
    computed by the reference model on the same tokens the loss uses; then set `reference: stored`."""
    import webdataset as wds

    model = task.reference_model(device)
    loader = task._loader(task.cfg.train.seq_len, 1, 0, 1)
    counters, written = Counters(), []
    for source in task.cfg.data.sources:
        for i, url in enumerate(source_shards(source, task.cfg.data.root)):
            path = Path(out_dir) / source.name / f"{i:06d}.tar"
            path.parent.mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(path), mtime=TAR_MTIME) as sink:
                for sample in read_shard(url, counters.skip):
                    members = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                    try:
                        record = sample_record(sample, "json")
                        example = loader.encode(record, 0)
                    except SkipSample:  # copied as it is: training skips it the same way
                        sink.write(members)
                        continue
                    batch = collate_pairs([example], task.chat.tokenizer.pad_id, task.max_tiles,
                                          task.frames_per_group)
                    logps, _ = labelled_logps(model, batch.tokens.to(device), batch.labels.to(device),
                                              **batch.media_inputs(device))
                    members["json"] = {**json.loads(record.text), "reference_logps": logps.tolist()}
                    sink.write(members)
            written.append(path)
    return written

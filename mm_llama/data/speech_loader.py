"""The speech loader: audio shards → normalised log-mel features (+ chat tokens), resumable at any batch.

Two kinds of batch, one stream:
- BEST-RQ pre-training (`tokenizer=None`): features only; audio over the front end's 60 s is cropped
  at random, then to `max_frames` log-mel frames (the paper's 6K-frame crop); each batch carries a
  `mask_seed` from which the objective draws its span masks, so the masks, too, replay on resume.
- The speech adapter stage (`tokenizer` given): each utterance becomes one dialog in the Llama 3 chat
  format, `[system: the task's prompt] user: <|speech_start|> <|speech|>×L <|speech_end|> assistant:
  target`, with L the adapter frames of the clip and the loss on the assistant's tokens only (ChatFormat's
  loss mask); spoken dialogue has no system prompt (SPEC §5.5). Dialogs longer than `max_tokens`
  are skipped and counted (`too_long_tokens`).

Reading order is the text loader's (`text_stream.SourceStream` and `mixing`): per source, a seeded shard
order per epoch split over ranks, a seeded shuffle buffer within a shard, sources mixed by a
counter-based draw. The loader runs in the calling process (no DataLoader workers: the decode cost is
small beside the encoder's), and its state is the mixing position of the next utterance plus its
counters; another number of ranks re-splits the positions (`resplit`). Every random choice for an
utterance (crop offset, SpecAugment) is drawn from a generator seeded by (run seed, shard, sample,
epoch), so a resumed loader yields the very same batches.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from encoders.speech.features import collate_features, features
from .accounting import Counters
from .config import DataConfig
from .mixing import Mixture, mixed_documents, start_position
from .resplit import check_states, resplit, summed
from .shards import DataError, read_shard, source_shards
from .speech import AudioCounters, SpeechSample, decode_speech_sample
from .text_stream import SkipSample, SourceStream, derive_seed

STATE_FORMAT = "mm_llama.data.SpeechLoader/1"
IGNORE = -100


@dataclass
class Utterance:
    """One decoded clip: feats `[frames, n_mels]`, its metadata, and (adapter stage) its dialog."""

    key: str
    feats: torch.Tensor
    meta: dict
    tokens: list[int] | None = None  # the whole dialog
    loss_mask: list[bool] | None = None
    prompt_len: int = 0  # tokens up to and including the assistant header (what generation starts from)
    target: str | None = None  # what the assistant should say


@dataclass
class SpeechBatch:
    """feats `[batch, frames, n_mels]`, feat_lengths `[batch]`; for the adapter stage also tokens and
    labels `[batch, seq]` (labels[i] is the target of position i, −100 = no loss) with one audio clip per row;
    `mask_seed` seeds BEST-RQ's masks. Held-out batches keep `prompts` (token lists to generate from),
    `references` (the target texts) and `tasks`."""

    feats: torch.Tensor
    feat_lengths: torch.Tensor
    tokens: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    mask_seed: int = 0
    keys: list[str] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    tasks: list[str | None] = field(default_factory=list)


class DialogBuilder:
    """Utterance → chat tokens: `frames_for(n_feature_frames)` placeholders for the clip."""

    def __init__(self, tokenizer, frames_for, max_tokens: int):
        from ..text import ChatFormat

        self.chat = ChatFormat(tokenizer)
        self.frames_for = frames_for
        self.max_tokens = max_tokens

    def messages(self, sample: SpeechSample, frames: int, with_answer: bool = True) -> list[dict]:
        msgs = [{"role": "system", "content": sample.prompt}] if sample.prompt is not None else []
        msgs.append({"role": "user", "content": [{"type": "audio", "frames": frames}]})
        if with_answer:
            msgs.append({"role": "assistant", "content": sample.target})
        return msgs

    def __call__(self, sample: SpeechSample, feats: torch.Tensor) -> Utterance:
        if sample.task is None:
            raise SkipSample("no task record (audio-only samples serve BEST-RQ, not the adapter stage)")
        frames = self.frames_for(feats.shape[0])
        dialog = self.chat.encode_dialog(self.messages(sample, frames))
        if len(dialog.tokens) - 1 > self.max_tokens:
            raise SkipSample(f"its dialog has {len(dialog.tokens)} tokens, more than {self.max_tokens} + 1")
        prompt = self.chat.encode_dialog(self.messages(sample, frames, with_answer=False), add_generation_prompt=True)
        return Utterance(sample.key, feats, sample.meta, dialog.tokens, dialog.loss_mask, len(prompt.tokens), sample.target)


class SpeechSourceStream(SourceStream):
    """`SourceStream` whose items are `Utterance`s (decoded audio, features, maybe a dialog) instead of texts.

    Set `decode` (sample, generator → SpeechSample | None, counting what it drops) and `make` (sample,
    generator → Utterance, raising SkipSample) after construction.
    """

    decode = None
    make = None

    kind = "speech sample"

    def example(self, sample: dict, shard: int, epoch: int) -> Utterance | None:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, sample.get("__key__"), shard, epoch))
        decoded = self.decode(sample, generator)
        if decoded is None:  # counted by reason in the audio counters
            self._problem = f"{self.urls[shard]} sample '{sample.get('__key__')}': unusable audio"
            return None
        return self.make(decoded, generator)


def crop_frames(feats: torch.Tensor, max_frames: int | None, generator: torch.Generator) -> torch.Tensor:
    """A random window of at most `max_frames` frames of `[frames, n_mels]`."""
    if max_frames is None or feats.shape[0] <= max_frames:
        return feats
    start = int(torch.randint(0, feats.shape[0] - max_frames + 1, (), generator=generator))
    return feats[start:start + max_frames]


def collate(utterances: list[Utterance], pad_id: int, mask_seed: int = 0) -> SpeechBatch:
    """Utterances → a `SpeechBatch`; dialogs are right-padded with `pad_id` to the longest."""
    feats, lengths = collate_features([u.feats for u in utterances])
    batch = SpeechBatch(feats, lengths, mask_seed=mask_seed, keys=[u.key for u in utterances],
                        tasks=[u.meta.get("task") for u in utterances])
    if utterances[0].tokens is not None:
        width = max(len(u.tokens) - 1 for u in utterances)
        tokens = torch.full((len(utterances), width), pad_id, dtype=torch.long)
        labels = torch.full((len(utterances), width), IGNORE, dtype=torch.long)
        for i, u in enumerate(utterances):
            n = len(u.tokens) - 1
            tokens[i, :n] = torch.tensor(u.tokens[:-1])
            targets = torch.tensor(u.tokens[1:])
            labels[i, :n] = torch.where(torch.tensor(u.loss_mask[1:]), targets, IGNORE)
        batch.tokens, batch.labels = tokens, labels
        batch.prompts = [u.tokens[:u.prompt_len] for u in utterances]
        batch.references = [u.target for u in utterances]
    return batch


class SpeechLoader:
    """Endless `SpeechBatch`es of `batch_size` utterances for one rank (module docstring).

    speech: the model's `SpeechConfig` (front end, frame rates). tokenizer: None for BEST-RQ batches, else
    the chat tokenizer (adapter-stage batches, dialogs up to `max_tokens` + 1 tokens). max_frames: the
    BEST-RQ crop, in log-mel frames.
    """

    def __init__(self, cfg: DataConfig, speech, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, *,
                 tokenizer=None, max_tokens: int = 2048, max_frames: int | None = None, train: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_frames is not None and max_frames < speech.encoder.stack:
            raise ValueError(f"max_frames {max_frames} is below one encoder frame ({speech.encoder.stack} log-mel frames)")
        self.cfg, self.speech, self.batch_size, self.seed = cfg, speech, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.tokenizer, self.max_tokens, self.max_frames, self.train = tokenizer, max_tokens, max_frames, train
        self.urls = {s.name: source_shards(s, cfg.root) for s in cfg.sources}
        self.position: dict | None = None
        self.counters, self.audio = Counters(), AudioCounters()
        self.builder = (DialogBuilder(tokenizer, frames_for(speech), max_tokens) if tokenizer is not None else None)

    # one utterance from one shard sample; used by the training stream and by `heldout_speech`
    def _decode(self, sample: dict, generator) -> SpeechSample | None:
        return decode_speech_sample(sample, self.speech.frontend, self.audio, stack=self.speech.encoder.stack,
                                    crop=self.builder is None, require_task=self.builder is not None, generator=generator)

    def _make(self, sample: SpeechSample, generator) -> Utterance:
        feats = features(sample.wave, self.speech.frontend.sample_rate, self.speech.frontend, train=self.train,
                         generator=generator)
        if self.builder is None:
            return Utterance(sample.key, crop_frames(feats, self.max_frames, generator), sample.meta)
        return self.builder(sample, feats)

    def __iter__(self) -> Iterator[SpeechBatch]:
        streams = []
        for s in self.cfg.sources:
            stream = SpeechSourceStream(s, self.urls[s.name], self.rank, self.world_size, self.seed, self.cfg.shuffle,
                                        self.cfg.shuffle_buffer, self.counters)
            stream.decode, stream.make = self._decode, self._make
            streams.append(stream)
        mixture = Mixture([s.weight for s in self.cfg.sources], self.seed, self.rank)
        utterances = mixed_documents(streams, mixture, self.position or start_position(streams))
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        while True:
            chunk = [next(utterances) for _ in range(self.batch_size)]
            first, last = chunk[0][1], chunk[-1][1]
            position = {"n": last["n"] + 1, "cursors": {k: list(v) for k, v in last["cursors"].items()}}
            position["cursors"][self.cfg.sources[mixture.choose(last["n"])].name][2] += 1
            self.position = position
            self.counters.documents += len(chunk)
            batch = collate([u for u, _ in chunk], pad, derive_seed(self.seed, "mask", self.rank, first["n"]))
            self.counters.tokens += int(batch.tokens.numel()) if batch.tokens is not None else int(batch.feat_lengths.sum())
            yield batch

    def _identity(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "sources": {name: len(urls) for name, urls in self.urls.items()}}

    def state_dict(self) -> dict:
        """Plain dicts and numbers: the mixing position of the next utterance and the counters."""
        return {"format": STATE_FORMAT, **self._identity(), "position": self.position,
                "stats": self.counters.to_dict(), "audio": self.audio.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a SpeechLoader state (expected format {STATE_FORMAT!r})")
        mine = self._identity()
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise ValueError("the speech loader state was saved under different settings, so it cannot continue "
                             "exactly: " + "; ".join(diff))
        self.position = state["position"]
        self.counters = Counters.from_dict(state.get("stats"))
        self.audio = AudioCounters.from_dict(state.get("audio"))

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from the states of all ranks of a run (`states[r]` is rank r's `state_dict()`): exactly with the
        same number of ranks, else from the positions re-split (`resplit`; rank 0 carries on all the counters)."""
        check_states(states, STATE_FORMAT, "a SpeechLoader", self._identity(), ("seed", "sources"))
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        self.position = resplit([st.get("position") for st in states],
                                {name: len(urls) for name, urls in self.urls.items()}, self.world_size, [self.rank])[0]
        mine = self.rank == 0
        self.counters = Counters.from_dict(summed([st.get("stats") for st in states]) if mine else None)
        self.audio = AudioCounters.from_dict(summed([st.get("audio") for st in states]) if mine else None)

    def stats(self) -> dict:
        """`skipped_samples` (unusable audio of every reason, bad records, over-long dialogs), `skipped_shards`,
        `utterances`, and the audio counters by reason."""
        audio = self.audio.to_dict()
        return {"skipped_samples": self.counters.skipped_samples + sum(audio["skipped"].values()),
                "skipped_shards": self.counters.skipped_shards, "utterances": self.counters.documents,
                "resampled": audio["resampled"], "cropped": audio["cropped"],
                **{f"skipped_{k}": v for k, v in sorted(audio["skipped"].items())}}


def frames_for(speech):
    """`n_feature_frames → adapter frames`: the `<|speech|>` placeholders a clip needs."""
    return lambda n: speech.adapter.output_length(speech.encoder.output_length(n))


def heldout_speech(cfg: DataConfig, speech, max_utterances: int, *, tokenizer=None, max_tokens: int = 2048,
                   max_frames: int | None = None) -> list[Utterance]:
    """Up to `max_utterances` utterances of `cfg.heldout`: sources, shards and samples in listed order, read
    once, without augmentation or random crops (crops take the start)."""
    loader = SpeechLoader(cfg, speech, 1, 0, tokenizer=tokenizer, max_tokens=max_tokens, max_frames=None, train=False)
    out: list[Utterance] = []
    for source in cfg.heldout:
        for url in source_shards(source, cfg.root):
            for sample in read_shard(url, loader.counters.skip):
                if len(out) >= max_utterances:
                    return out
                decoded = loader._decode(sample, torch.Generator().manual_seed(0))
                if decoded is None:
                    continue
                try:
                    u = loader._make(decoded, None)
                except SkipSample as e:
                    loader.counters.skip("sample", f"{url} sample '{sample.get('__key__')}': {e}")
                    continue
                if max_frames is not None:
                    u.feats = u.feats[:max_frames]
                out.append(u)
    if not out and cfg.heldout and max_utterances > 0:
        raise DataError(f"held-out sources {', '.join(s.name for s in cfg.heldout)}: no usable speech sample "
                        f"({loader.stats()['skipped_samples']} skipped)")
    return out

"""Dialog and preference shards for post-training (SPEC §3): schemas, resumable loaders, SFT packing.

Shard schema (WebDataset tar files, one sample per dialog; the `json` member holds the record):

| record                | `<key>.json`                                                                        |
|-----------------------|-------------------------------------------------------------------------------------|
| SFT dialog            | `{"messages": [message, ...]}`, Llama 3 chat messages (`mm_llama.text.chat_format`)  |
| preference ranking    | `{"prompt": [message, ...], "responses": [best, ..., worst], "strength": optional}` |

A response is the text of one assistant message, or an assistant message dict. A ranking holds 2 or
3 responses, best first: `[chosen, rejected]` or `[edited, chosen, rejected]` (paper §4.2.1).
`strength` is the annotators' rating of the gap, one of `STRENGTHS`; a stage may keep only some.
A source's `text_key` names the member read (`txt`, the default of text sources, means `json` here).

Media live in the same sample as the record and are referenced from the messages by content parts:

| part                                   | the sample's member(s)                                                  |
|----------------------------------------|-------------------------------------------------------------------------|
| `{"type": "image", "member": "jpg"}`   | `<key>.jpg` (jpg/jpeg/png/webp)                                          |
| `{"type": "audio", "member": "flac"}`  | `<key>.flac` (flac/wav/mp3/ogg; any rate and channel count)              |
| `{"type": "video", "member": "clip"}`  | numbered frames `<key>.clip.000.jpg`, `<key>.clip.001.jpg`, … (3+ digits) |

Without `member`, the sample's only member of that kind (a video: its unprefixed frames `<key>.000.jpg`, …,
else its only frame prefix). A part naming a member the sample lacks makes the record skipped and counted. A
loader given `decode_media` (`MediaParts`) hands each media part's bytes (a video: its frames) to it in message
order and keeps what it returns on the example (`media`): images are tiled as the image loaders do, videos
sampled and decoded by `mm_llama.data.video` (up to `max_frames`, uniformly; an unusable frame is counted and
the clip keeps the rest), audio decoded and turned into normalised log-mels by `mm_llama.data.speech` and the
speech front end (no SpecAugment). An audio part is encoded as `<|speech_start|> <|speech|>×L <|speech_end|>`,
L = `SpeechConfig.adapter_frames(samples)`, the speech stage's layout. Without `decode_media` (a text model) a
dialog holding media is skipped and counted; so is one whose media the model has no encoder for. Unusable
media are counted by reason (`stats()`: `skipped_media_<reason>`, e.g. `audio_bad_header`, `video_no_frames`,
`frame_truncated` for a dropped frame of a kept clip). A packed SFT row keeps each dialog's media beside it
(`SFTBatch.images`/`image_docs`, `videos`/`video_docs`, `speech_feats`/`speech_docs`), so a dialog sees its
own only. An SFT loader may also read rankings as dialogs (`rankings=True`): the prompt and its best response.

Loaders run in the training process (dialogs are small JSON records; tokenising them is cheap) and
reuse the text pipeline's seeded walk over shards and weighted mix (`text_stream`, `mixing`). Their
position is that of the first record not yet delivered, so a resumed loader continues exactly; another
number of ranks re-splits the positions (`resplit`).
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .accounting import Counters, summarize
from .config import DataConfig, SourceConfig
from .mixing import Mixture, mixed_documents, start_position
from .resplit import check_states, resplit, summed
from .shards import DataError, read_shard, source_shards
from .text_stream import SkipSample, SourceStream, derive_seed, sample_text

IGNORE = -100
MEDIA_MEMBERS = {"image": ("jpg", "jpeg", "png", "webp"), "audio": ("flac", "wav", "mp3", "ogg"),
                 "video": ("jpg", "jpeg", "png", "webp")}  # a video's members are its numbered frames
MAX_IMAGE_PIXELS = 64 * 2**20  # as the image loaders: beyond this an image is a decompression bomb
STRENGTHS = ("significantly_better", "better", "slightly_better", "marginally_better")
STATE_FORMAT = "mm_llama.data.DialogLoader/1"


class Filtered(SkipSample):
    """A usable record the stage leaves out on purpose (e.g. a preference rated too weak): counted, not logged."""


class MediaSkip(SkipSample):
    """A record skipped for its media; `reason` names the counter (`missing_member`, `audio_too_short`, ...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class UnsupportedMedia(ValueError):
    """A media part a stage refuses outright (not a skip): its objective has no model for that kind."""


# ------------------------------------------------------------------------------ records


@dataclass
class Ranking:
    """A prompt and 2 or 3 responses, best first (already in the chat format's message form)."""

    prompt: list[dict]
    responses: list[dict]
    strength: str | None = None
    reference_logps: list[float] | None = None  # stored reference-model log-probs, one per response


@dataclass
class Record:
    """One shard sample: its record's text and the sample's other members by name (the media bytes)."""

    text: str
    media: dict[str, bytes] = field(default_factory=dict)


def sample_record(sample: dict, text_key: str) -> Record:
    """A shard sample as a `Record` (SkipSample when its record member is missing or not text)."""
    text = sample_text(sample, text_key)
    record_member = text_key.split(".")[0].lower()
    media = {k: v for k, v in sample.items() if not k.startswith("__") and k != record_member and isinstance(v, bytes)}
    return Record(text, media)


def media_parts(messages: list) -> list[Mapping]:
    """Every non-text content part of `messages`, in order."""
    return [p for m in messages if isinstance(m, Mapping) and isinstance(m.get("content"), list)
            for p in m["content"] if isinstance(p, Mapping) and p.get("type") != "text"]


def _media(messages: list) -> bool:
    return bool(media_parts(messages))


def video_frames(media: Mapping[str, bytes], prefix: str) -> dict[str, bytes]:
    """The frames of the video stored under `prefix` (`<prefix>.000.jpg`, …; "" = unprefixed `000.jpg`, …), by
    their names without the prefix, as `mm_llama.data.video` reads a video sample."""
    from .video import FRAME_MEMBER

    lead = f"{prefix}." if prefix else ""
    return {name[len(lead):]: data for name, data in media.items()
            if name.startswith(lead) and FRAME_MEMBER.fullmatch(name[len(lead):])}


def _frame_prefixes(media: Mapping[str, bytes]) -> list[str]:
    from .video import FRAME_MEMBER

    return sorted({name.rsplit(".", 2)[0] if name.count(".") >= 2 else "" for name in media
                   if FRAME_MEMBER.fullmatch(".".join(name.rsplit(".", 2)[-2:]))})


def media_members(messages: list, media: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """`(kind, member)` of each media part of `messages` in order (a video's member is its frame prefix);
    MediaSkip naming a part whose member the sample lacks (or, without `member`, when the sample has not
    exactly one member of that kind)."""
    out = []
    for i, part in enumerate(media_parts(messages)):
        kind = part.get("type")
        if kind not in MEDIA_MEMBERS:
            raise MediaSkip("unknown_part", f"media part {i}: type {kind!r} is not one of text, "
                            f"{', '.join(MEDIA_MEMBERS)}")
        member = part.get("member")
        if kind == "video":
            prefixes = _frame_prefixes(media)
            if member is None:
                if "" not in prefixes and len(prefixes) != 1:
                    raise MediaSkip("missing_member", f"media part {i} (video) names no 'member' and the sample has "
                                    f"{len(prefixes)} frame prefixes ({', '.join(prefixes) or 'none'})")
                member = "" if "" in prefixes else prefixes[0]
            elif not isinstance(member, str) or member.lower() not in prefixes:
                raise MediaSkip("missing_member", f"media part {i} (video) refers to frames {member!r}.000.jpg, ..., "
                                f"which the sample does not hold (has: {', '.join(sorted(media)) or 'none'})")
        elif member is None:
            found = [m for m in media if m.rsplit(".", 1)[-1] in MEDIA_MEMBERS[kind]
                     and not (kind == "image" and _frame_prefixes({m: b""}))]
            if len(found) != 1:
                raise MediaSkip("missing_member", f"media part {i} ({kind}) names no 'member' and the sample has "
                                f"{len(found)} {kind} members ({', '.join(found) or 'none'})")
            member = found[0]
        elif not isinstance(member, str) or member.lower() not in media:
            raise MediaSkip("missing_member", f"media part {i} ({kind}) refers to member {member!r}, which the "
                            f"sample does not hold (has: {', '.join(sorted(media)) or 'none'})")
        out.append((kind, member.lower()))
    return out


def resolve_media(messages: list, media: Mapping[str, bytes], decode_media: Callable[[str, str, Any], Any] | None
                  ) -> list:
    """The decoded media of `messages` in order (`decode_media(kind, member, data)`, data: the member's bytes,
    a video's `{frame name: bytes}`); SkipSample when the dialog holds media and there is no decoder (a text
    model), or when a member is missing or undecodable."""
    members = media_members(messages, media)
    if members and decode_media is None:
        raise MediaSkip("text_model", "the dialog holds media parts; a text model cannot read them")
    return [decode_media(kind, member, video_frames(media, member) if kind == "video" else media[member])
            for kind, member in members]


def with_audio_frames(messages: list, media: list) -> list:
    """`messages` with each audio part given its placeholder count (`"frames"`: the decoded clip's adapter
    frames), which the chat format turns into `<|speech_start|> <|speech|>×frames <|speech_end|>`."""
    clips = iter([m for m in media if isinstance(m, AudioPart)])
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list) and any(isinstance(p, Mapping) and p.get("type") == "audio" for p in content):
            content = [{**p, "frames": next(clips).frames} if isinstance(p, Mapping) and p.get("type") == "audio"
                       else p for p in content]
            m = {**m, "content": content}
        out.append(m)
    return out


def parse_dialog(record: Any, media_ok: bool = False) -> list[dict]:
    """The `messages` of an SFT record; SkipSample naming what is wrong."""
    if not isinstance(record, Mapping) or "messages" not in record:
        raise SkipSample("an SFT record is a JSON object with 'messages'")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise SkipSample("'messages' must be a non-empty list")
    if not any(isinstance(m, Mapping) and m.get("role") == "assistant" for m in messages):
        raise SkipSample("'messages' has no assistant message, so nothing to learn")
    if not media_ok and _media(messages):
        raise SkipSample("the dialog holds media parts; a text model cannot read them")
    return list(messages)


def ranking_dialog(record: Any, media_ok: bool = False) -> list[dict]:
    """A preference record as an SFT dialog: its prompt and its best response (the assistant turn)."""
    ranking = parse_ranking(record, media_ok)
    return [*ranking.prompt, ranking.responses[0]]


def parse_ranking(record: Any, media_ok: bool = False) -> Ranking:
    """A preference record as a `Ranking`; SkipSample naming what is wrong."""
    if not isinstance(record, Mapping) or "prompt" not in record or "responses" not in record:
        raise SkipSample("a preference record is a JSON object with 'prompt' and 'responses'")
    prompt, responses = record["prompt"], record["responses"]
    if not isinstance(prompt, list) or not prompt:
        raise SkipSample("'prompt' must be a non-empty list of messages")
    if isinstance(prompt[-1], Mapping) and prompt[-1].get("role") == "assistant":
        raise SkipSample("'prompt' ends with an assistant message; the responses answer it instead")
    if not isinstance(responses, list) or not 2 <= len(responses) <= 3:
        raise SkipSample("'responses' must list 2 or 3 responses, best first")
    as_messages = []
    for i, r in enumerate(responses):
        if isinstance(r, str):
            r = {"role": "assistant", "content": r}
        if not isinstance(r, Mapping) or r.get("role", "assistant") != "assistant":
            raise SkipSample(f"responses[{i}] must be a string or an assistant message")
        as_messages.append({"role": "assistant", **r})
    strength = record.get("strength")
    if strength is not None and strength not in STRENGTHS:
        raise SkipSample(f"'strength' {strength!r} is not one of {', '.join(STRENGTHS)}")
    if _media(as_messages):
        raise SkipSample("a response holds media parts; responses are assistant text")
    if not media_ok and _media(prompt):
        raise SkipSample("the prompt holds media parts; a text model cannot read them")
    reference = record.get("reference_logps")
    if reference is not None and (not isinstance(reference, list) or len(reference) != len(responses)
                                  or not all(isinstance(x, (int, float)) for x in reference)):
        raise SkipSample("'reference_logps' must hold one number per response")
    return Ranking(list(prompt), as_messages, strength, reference)


def read_record(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SkipSample(f"not valid JSON ({e.msg})") from None


# ------------------------------------------------------------------------------ encoded examples


@dataclass
class EncodedRanking:
    """`prompt` ids (ending with the assistant header), each response's ids (content + terminator) and
    the mask of its tokens that count in a loss (DPO leaves out header and termination tokens)."""

    prompt: list[int]
    responses: list[list[int]]
    loss_masks: list[list[bool]]
    n: int  # the mixer's draw number of this record in its consumer: seeds per-example randomness
    reference_logps: list[float] | None = None
    media: list = field(default_factory=list)  # the prompt's decoded media, in order


def encode_ranking(chat, ranking: Ranking, n: int = 0, mask_formatting: bool = True) -> EncodedRanking:
    """Tokenise a ranking with `ChatFormat` `chat`; ValueError from the chat format becomes SkipSample."""
    tok = chat.tokenizer
    formatting = {tok.start_header_id, tok.end_header_id, tok.eot_id, tok.eom_id} if mask_formatting else set()
    try:
        prompt = chat.encode_dialog(ranking.prompt, add_generation_prompt=True).tokens
        responses, masks = [], []
        header = len(chat.encode_header("assistant"))
        for r in ranking.responses:
            ids, mask = chat.encode_message(r)
            ids, mask = ids[header:], mask[header:]  # the prompt already ends with the assistant header
            responses.append(ids)
            masks.append([m and t not in formatting for t, m in zip(ids, mask)])
    except ValueError as e:
        raise SkipSample(str(e)) from None
    return EncodedRanking(prompt, responses, masks, n, ranking.reference_logps)


# ------------------------------------------------------------------------------ the record stream


def _json_source(source: SourceConfig) -> SourceConfig:
    return source.model_copy(update={"text_key": "json"}) if source.text_key == "txt" else source


class RecordSourceStream(SourceStream):
    """`SourceStream` whose items are `Record`s: the record's text and the sample's media members."""

    kind = "dialog record"

    def example(self, sample: dict, shard: int, epoch: int) -> Record:
        return sample_record(sample, self.source.text_key)


class RecordStream:
    """One rank's endless, seeded walk over the mixed record sources, with a one-record look-ahead.

    `peek()` is the next usable example and `position` the place that re-creates the stream with it
    first; `take()` consumes it. `encode(record, n)` turns a `Record` into an example or raises
    SkipSample (counted as a skipped sample and logged).
    """

    def __init__(self, cfg: DataConfig, encode: Callable[[Record, int], Any], seed: int, rank: int, world_size: int,
                 position: dict | None, counters: Counters):
        sources = [_json_source(s) for s in cfg.sources]
        urls = {s.name: source_shards(s, cfg.root) for s in sources}
        streams = [RecordSourceStream(s, urls[s.name], rank, world_size, seed, cfg.shuffle, cfg.shuffle_buffer,
                                      counters)
                   for s in sources]
        self._docs = mixed_documents(streams, Mixture([s.weight for s in sources], seed, rank),
                                     position or start_position(streams))
        self._encode, self._counters = encode, counters
        self._next: tuple[Any, dict] | None = None
        self.filtered = 0
        self.media_skipped: dict[str, int] = {}  # records skipped for their media, and dropped frames, by reason

    def _count(self, reason: str, n: int = 1) -> None:
        self.media_skipped[reason] = self.media_skipped.get(reason, 0) + n

    def _fill(self) -> None:
        while self._next is None:
            record, position = next(self._docs)
            try:
                self._next = (self._encode(record, int(position["n"])), position)
            except Filtered:
                self.filtered += 1
            except SkipSample as e:
                if isinstance(e, MediaSkip):
                    self._count(e.reason)
                self._counters.skip("sample", f"record {position['n']} at {position['cursors']}: {e}")
            else:
                for part in getattr(self._next[0], "media", []):
                    for reason, n in getattr(part, "skipped", {}).items():
                        self._count(f"frame_{reason}", n)

    def peek(self) -> Any:
        self._fill()
        return self._next[0]

    @property
    def position(self) -> dict:
        self._fill()
        return self._next[1]

    def take(self) -> Any:
        item = self.peek()
        self._next = None
        return item


def heldout_records(cfg: DataConfig, encode: Callable[[Record, int], Any], limit: int) -> list:
    """Up to `limit` examples from `cfg.heldout`: sources, shards and samples in listed order, read once."""
    counters = Counters()
    out: list = []
    for source in map(_json_source, cfg.heldout):
        for url in source_shards(source, cfg.root):
            for sample in read_shard(url, counters.skip):
                if len(out) >= limit:
                    return out
                try:
                    out.append(encode(sample_record(sample, source.text_key), len(out)))
                except Filtered:
                    continue
                except SkipSample as e:
                    counters.skip("sample", f"{url} sample '{sample.get('__key__')}': {e}")
    if not out and cfg.heldout and limit > 0:
        raise DataError(f"held-out sources {', '.join(s.name for s in cfg.heldout)}: no usable record "
                        f"({counters.skipped_shards} shards and {counters.skipped_samples} samples skipped)")
    return out


# ------------------------------------------------------------------------------ loaders


@dataclass
class _LoaderBase:
    cfg: DataConfig
    seed: int
    rank: int = 0
    world_size: int = 1
    _position: dict | None = field(default=None, init=False)
    _stats: dict = field(default_factory=dict, init=False)
    _filtered: int = field(default=0, init=False)
    _media_skipped: dict = field(default_factory=dict, init=False)
    _shards: dict | None = field(default=None, init=False)  # shard count per source, read when first needed

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    def _identity(self) -> dict:
        return {"kind": type(self).__name__, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "sources": [s.name for s in self.cfg.sources]}

    def _shard_counts(self) -> dict[str, int]:
        if self._shards is None:
            self._shards = {s.name: len(source_shards(s, self.cfg.root)) for s in self.cfg.sources}
        return self._shards

    def _stream(self, encode) -> tuple[RecordStream, Counters]:
        counters = Counters.from_dict(self._stats)
        stream = RecordStream(self.cfg, encode, self.seed, self.rank, self.world_size, self._position, counters)
        stream.filtered = self._filtered
        stream.media_skipped = dict(self._media_skipped)
        self._shard_counts()
        return stream, counters

    def _delivered(self, stream: RecordStream, counters: Counters) -> None:
        self._position = stream.position
        self._stats = counters.to_dict()
        self._filtered = stream.filtered
        self._media_skipped = dict(stream.media_skipped)

    def state_dict(self) -> dict:
        """Plain dicts and numbers: the position of the next record, the counters, and each source's shard count
        (None before the loader has read)."""
        return {"format": STATE_FORMAT, **self._identity(), "position": self._position, "stats": dict(self._stats),
                "filtered": self._filtered, "media_skipped": dict(self._media_skipped),
                "shards": None if self._shards is None else dict(self._shards)}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a dialog loader state (expected format {STATE_FORMAT!r})")
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._identity().items() if state.get(k) != v]
        if state.get("shards") is not None and state["shards"] != self._shard_counts():
            diff.append(f"shards: saved {state['shards']!r}, now {self._shard_counts()!r}")
        if diff:
            raise ValueError("the data loader state was saved under different settings, so it cannot continue "
                             "exactly: " + "; ".join(diff))
        self._position, self._stats = state["position"], dict(state["stats"])
        self._filtered = int(state.get("filtered", 0))
        self._media_skipped = {k: int(v) for k, v in state.get("media_skipped", {}).items()}

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue from the states of all ranks of a run (`states[r]` is rank r's `state_dict()`): exactly with the
        same number of ranks, else from the positions re-split (`resplit`; rank 0 carries on all the counters)."""
        check_states(states, STATE_FORMAT, "a dialog loader", self._identity(), ("kind", "seed", "sources"))
        if len(states) == self.world_size:
            self.load_state_dict(states[self.rank])
            return
        shards = self._shard_counts()
        for i, st in enumerate(states):
            if st.get("position") is not None and st.get("shards") != shards:
                raise ValueError(f"data state {i} was saved with shard counts {st.get('shards')!r} (now {shards!r}), "
                                 "so its position cannot be re-split")
        self._position = resplit([st.get("position") for st in states], shards, self.world_size, [self.rank])[0]
        mine = self.rank == 0
        self._stats = summed([st.get("stats") for st in states]) if mine else {}
        self._filtered = sum(int(st.get("filtered", 0)) for st in states) if mine else 0
        self._media_skipped = summed([st.get("media_skipped") for st in states]) if mine else {}

    def stats(self) -> dict:
        """`skipped_samples`, `skipped_shards`, `documents` (records delivered), `packing_efficiency`, `tokens`,
        `filtered` (records left out on purpose), `skipped_media_<reason>` (records skipped for their media; for
        `frame_<reason>`, frames dropped from clips that were kept)."""
        return {**summarize([Counters.from_dict(self._stats)]), "filtered": self._filtered,
                **{f"skipped_media_{k}": v for k, v in sorted(self._media_skipped.items())}}


@dataclass
class SFTBatch:
    """Packed dialogs. `tokens`, `labels` (-100: no loss), `doc_ids`: LongTensor `[batch, seq]`.

    With media (a composed model's batch holding any; `collate_media` gives the shapes): each row's images in
    `<|image|>` order (`images`, `aspect_ratios`, `image_docs`: the `doc_ids` value of the dialog each belongs
    to, -1: empty slot), its videos in `<|video|>` order (`videos`, `video_aspect_ratios`, `frame_mask`,
    `video_docs`), and the audio clips of all rows in reading order (`speech_feats`, `speech_lengths`,
    `speech_docs`), one per `<|speech|>` span."""

    tokens: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    images: torch.Tensor | None = None
    aspect_ratios: torch.Tensor | None = None
    image_docs: torch.Tensor | None = None
    videos: torch.Tensor | None = None
    video_aspect_ratios: torch.Tensor | None = None
    frame_mask: torch.Tensor | None = None
    video_docs: torch.Tensor | None = None
    speech_feats: torch.Tensor | None = None
    speech_lengths: torch.Tensor | None = None
    speech_docs: torch.Tensor | None = None

    def to(self, device) -> "SFTBatch":
        return SFTBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                           for f in fields(self)})


@dataclass
class DialogExample:
    """One encoded dialog as next-token `inputs` and `labels` (-100 off assistant output), and its decoded media."""

    inputs: list[int]
    labels: list[int]
    media: list = field(default_factory=list)


def dialog_example(dialog, media: list | None = None) -> DialogExample:
    """An `EncodedDialog` as a `DialogExample`: labels only where the target is assistant output."""
    inputs = dialog.tokens[:-1]
    labels = [t if m else IGNORE for t, m in zip(dialog.tokens[1:], dialog.loss_mask[1:])]
    return DialogExample(inputs, labels, list(media or []))


def pack_rows(examples: list[list[DialogExample]], seq_len: int, pad_id: int, max_tiles: int = 0,
              frames_per_group: int = 1) -> SFTBatch:
    """Whole dialogs side by side in rows of `seq_len`: one row per list entry of `examples`.

    The rest of a row is padding with its own document id and no labels. `doc_ids` number the dialogs
    of a row, so attention stays inside a dialog and positions restart at each. The dialogs' media are
    batched by `collate_media` (images with `max_tiles` tile slots), each tagged with its dialog's id.
    """
    tokens = torch.full((len(examples), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), seq_len), IGNORE, dtype=torch.long)
    doc_ids = torch.empty((len(examples), seq_len), dtype=torch.long)
    for r, row in enumerate(examples):
        at = 0
        for d, e in enumerate(row):
            tokens[r, at:at + len(e.inputs)] = torch.tensor(e.inputs)
            labels[r, at:at + len(e.labels)] = torch.tensor(e.labels)
            doc_ids[r, at:at + len(e.inputs)] = d
            at += len(e.inputs)
        doc_ids[r, at:] = len(row)
    media = [[(d, m) for d, e in enumerate(row) for m in e.media] for row in examples]
    return SFTBatch(tokens, labels, doc_ids, **collate_media(media, max_tiles, frames_per_group))


@dataclass
class SFTLoader(_LoaderBase):
    """Endless packed SFT batches `[batch_size, seq_len]`: whole dialogs, loss on assistant tokens only.

    Dialogs are placed greedily in stream order; one that does not fit ends the row (padded) and opens
    the next. A dialog longer than a row is skipped and counted. With `decode_media` (an image model:
    `ImageParts`) dialogs keep their images and batches carry them (`max_tiles` slots per image);
    `rankings`: the records are preference rankings, each read as its prompt and best response.
    """

    chat: Any = None
    seq_len: int = 0
    batch_size: int = 0
    decode_media: Callable[[str, str, Any], Any] | None = None
    max_tiles: int = 0
    rankings: bool = False
    frames_per_group: int = 1  # a video model's aggregation: clips' frames are padded to a multiple of it

    def __post_init__(self):
        super().__post_init__()
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {self.seq_len} and {self.batch_size}")
        kinds = getattr(self.decode_media, "kinds", ("image",))
        if self.decode_media is not None and self.max_tiles < 1 and {"image", "video"} & set(kinds):
            raise ValueError("an SFT loader that decodes images needs max_tiles >= 1 (the encoder's tile slots)")

    def encode(self, record: Record, n: int) -> DialogExample:
        media_ok = self.decode_media is not None
        parse = ranking_dialog if self.rankings else parse_dialog
        messages = parse(read_record(record.text), media_ok=media_ok)
        media = resolve_media(messages, record.media, self.decode_media)
        try:
            dialog = self.chat.encode_dialog(with_audio_frames(messages, media))
        except ValueError as e:
            raise SkipSample(str(e)) from None
        if len(dialog) - 1 > self.seq_len:
            raise SkipSample(f"the dialog has {len(dialog)} tokens, more than a row of {self.seq_len} + 1")
        return dialog_example(dialog, media)

    def pack(self, rows: list[list[DialogExample]]) -> SFTBatch:
        return pack_rows(rows, self.seq_len, self.chat.tokenizer.pad_id, self.max_tiles, self.frames_per_group)

    def __iter__(self) -> Iterator[SFTBatch]:
        stream, counters = self._stream(self.encode)
        while True:
            rows, documents = [], 0
            for _ in range(self.batch_size):
                row, used = [], 0
                while used + len(stream.peek().inputs) <= self.seq_len:
                    row.append(stream.take())
                    used += len(row[-1].inputs)
                rows.append(row)
                documents += len(row)
            batch = self.pack(rows)
            counters.documents += documents
            counters.tokens += batch.tokens.numel()
            counters.trained_labels += int((batch.labels != IGNORE).sum())
            self._delivered(stream, counters)
            yield batch


def sft_heldout(cfg: DataConfig, chat, seq_len: int, batch_size: int, max_batches: int, **media) -> list[SFTBatch]:
    """Fixed held-out SFT batches from `cfg.heldout` (one dialog per row, so every dialog counts once);
    `media`: the loader's `decode_media`, `max_tiles`, `frames_per_group` and `rankings` settings."""
    loader = SFTLoader(cfg, 0, chat=chat, seq_len=seq_len, batch_size=batch_size, **media)
    examples = heldout_records(cfg, loader.encode, max_batches * batch_size)
    return [loader.pack([[e] for e in examples[i:i + batch_size]]) for i in range(0, len(examples), batch_size)]


@dataclass
class PreferenceLoader(_LoaderBase):
    """Endless lists of `batch_size` encoded rankings; a task's `collate` turns each list into tensors.

    `strengths` keeps only rankings rated one of them (records without a rating are kept); a ranking
    whose prompt plus its longest response (or all its responses, with `concatenated`) needs more
    than `max_tokens` is skipped and counted.
    """

    chat: Any = None
    batch_size: int = 0
    max_tokens: int = 0
    strengths: tuple[str, ...] = STRENGTHS
    mask_formatting: bool = True
    concatenated: bool = False  # all responses in one row after the prompt (the reward model's rows)
    collate: Callable[[list[EncodedRanking]], Any] | None = None
    decode_media: Callable[[str, str, Any], Any] | None = None  # (kind, member, data) -> decoded, or SkipSample

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        bad = [s for s in self.strengths if s not in STRENGTHS]
        if bad:
            raise ValueError(f"strengths: unknown {bad}; expected some of {', '.join(STRENGTHS)}")

    def encode(self, record: Record | str, n: int) -> EncodedRanking:
        if isinstance(record, str):
            record = Record(record)
        ranking = parse_ranking(read_record(record.text), media_ok=self.decode_media is not None)
        if ranking.strength is not None and ranking.strength not in self.strengths:
            raise Filtered(f"rated {ranking.strength!r}; this stage keeps {', '.join(self.strengths)}")
        media = resolve_media(ranking.prompt, record.media, self.decode_media)
        ranking.prompt = with_audio_frames(ranking.prompt, media)
        example = encode_ranking(self.chat, ranking, n, self.mask_formatting)
        example.media = media
        lengths = [len(r) for r in example.responses]
        need = len(example.prompt) + (sum(lengths) if self.concatenated else max(lengths))
        if self.max_tokens and need > self.max_tokens:
            raise SkipSample(f"prompt and response need {need} tokens, more than {self.max_tokens}")
        return example

    def __iter__(self) -> Iterator[Any]:
        stream, counters = self._stream(self.encode)
        while True:
            examples = [stream.take() for _ in range(self.batch_size)]
            batch = self.collate(examples) if self.collate is not None else examples
            counters.documents += len(examples)
            counters.tokens += sum(len(e.prompt) + sum(map(len, e.responses)) for e in examples)
            counters.trained_labels += sum(sum(map(sum, e.loss_masks)) for e in examples)
            self._delivered(stream, counters)
            yield batch


def example_rng(seed: int, rank: int, n: int) -> random.Random:
    """Per-example randomness (e.g. the order of responses in a row) that a resumed run repeats."""
    return random.Random(derive_seed(seed, "example", rank, n))


@dataclass
class AudioPart:
    """One decoded audio part: normalised log-mels `[frames, n_mels]` and its `<|speech|>` placeholder count."""

    feats: torch.Tensor
    frames: int


@dataclass
class VideoPart:
    """One decoded video part: its `Clip` (sampled, tiled frames) and the frames dropped, by reason."""

    clip: Any
    skipped: dict[str, int] = field(default_factory=dict)


class MediaParts:
    """`decode_media` for composed models: `(kind, member, data)` → the part as its model reads it.

    Images (`tile_size`, `max_tiles`): `image_text.Tiled`, decoded, size-checked and tiled as the image
    loaders do. Videos (also `max_frames`): `VideoPart`, frames sampled and decoded by `video.VideoDecoder`.
    Audio (`speech`, a `SpeechConfig`): `AudioPart`, decoded by `speech.decode_speech_sample` (60 s at most)
    and turned into normalised log-mels by the speech front end (no SpecAugment). Unusable media raise
    `MediaSkip` with the reason; a kind the model has no encoder for is skipped (`unsupported_<kind>`),
    or, for a kind in `refuse`, raises `UnsupportedMedia` (an objective that cannot take it at all).
    """

    def __init__(self, *, tile_size: int = 0, max_tiles: int = 0, max_frames: int = 0, speech: Any = None,
                 refuse: tuple[str, ...] = ()):
        self.tile_size, self.max_tiles, self.max_frames, self.speech = tile_size, max_tiles, max_frames, speech
        self.refuse = tuple(refuse)
        self.kinds = tuple(k for k, ok in (("image", tile_size > 0), ("video", tile_size > 0 and max_frames > 0),
                                           ("audio", speech is not None)) if ok)

    def __call__(self, kind: str, member: str, data):
        if kind not in self.kinds:
            if kind in self.refuse:
                raise UnsupportedMedia(f"member {member!r}: this stage does not take {kind} parts (its model has no "
                                       f"{kind} input); remove the {kind} dialogs from its data")
            raise MediaSkip(f"unsupported_{kind}", f"member {member!r}: {kind} parts need a model with a {kind} "
                            "encoder")
        return getattr(self, f"_{kind}")(member, data)

    def _image(self, member: str, data: bytes):
        from encoders.vision.transform import tile_image

        from .image_text import ImageError, Tiled, decode_image

        try:
            pixels = decode_image(data, member.rsplit(".", 1)[-1], MAX_IMAGE_PIXELS)
        except ImageError as e:
            raise MediaSkip(f"image_{e.reason}", f"member {member!r}: {e}") from None
        tiles, grid = tile_image(pixels, self.tile_size, self.max_tiles)
        return Tiled(tiles, grid)

    def _video(self, member: str, frames: dict[str, bytes]) -> VideoPart:
        from .image_text import ImageCounters
        from .video import VideoDecoder

        counters = ImageCounters()
        sample = {"__key__": f"video {member or '(unprefixed)'}", **frames}
        clip = VideoDecoder(self.tile_size, self.max_tiles, self.max_frames, MAX_IMAGE_PIXELS)(sample, counters)
        if clip is None:
            raise MediaSkip("video_no_frames", f"video {member!r}: no usable frame among {len(frames)} frames "
                            f"({counters.skipped})")
        return VideoPart(clip, dict(counters.skipped))

    def _audio(self, member: str, data: bytes) -> AudioPart:
        from encoders.speech.features import features

        from .speech import AUDIO_MEMBERS, AudioCounters, decode_speech_sample

        counters = AudioCounters()
        # soundfile reads the container from the bytes; the sample's member name only has to be one it looks for
        decoded = decode_speech_sample({"__key__": member, AUDIO_MEMBERS[0]: data}, self.speech.frontend, counters,
                                       stack=self.speech.encoder.stack)
        if decoded is None:
            reason = next(iter(counters.skipped), "unusable")
            raise MediaSkip(f"audio_{reason}", f"member {member!r}: unusable audio ({reason})")
        rate = self.speech.frontend.sample_rate
        return AudioPart(features(decoded.wave, rate, self.speech.frontend),
                         self.speech.adapter_frames(decoded.wave.shape[0]))


class ImageParts(MediaParts):
    """`MediaParts` for image models: image parts only (an audio or video part is skipped and counted)."""

    def __init__(self, tile_size: int, max_tiles: int):
        super().__init__(tile_size=tile_size, max_tiles=max_tiles)


def collate_media(rows: list[list[tuple[int, Any]]], max_tiles: int = 0, frames_per_group: int = 1
                  ) -> dict[str, torch.Tensor]:
    """Per row, `(owner, decoded part)` in reading order → the model's media tensors, each with its owners
    (the row's document id of the dialog a part belongs to; -1: empty slot). Only the kinds present appear:

    - `images` `[batch, n_images, max_tiles, 3, S, S]`, `aspect_ratios` `[batch, n_images, 2]`, `image_docs`
      `[batch, n_images]`;
    - `videos` `[batch, n_videos, frames, max_tiles, 3, S, S]`, `video_aspect_ratios` `[batch, n_videos, frames, 2]`,
      `frame_mask` `[batch, n_videos, frames]` (`video.collate_videos`: frames padded to a multiple of
      `frames_per_group`), `video_docs` `[batch, n_videos]`;
    - `speech_feats` `[n_clips, frames, n_mels]`, `speech_lengths` `[n_clips]`, `speech_docs` `[n_clips]`: the
      clips of all rows in reading order (row by row), as `SpeechLM` splices them.
    """
    if not any(rows):  # a text batch: no media, and no need to import the media libraries
        return {}
    from encoders.speech.features import collate_features
    from encoders.vision.transform import stack_images

    from .image_text import Tiled
    from .video import collate_videos

    out: dict[str, torch.Tensor] = {}
    kinds = {"image": Tiled, "video": VideoPart, "audio": AudioPart}
    per_kind = {k: [[(d, m) for d, m in row if isinstance(m, cls)] for row in rows] for k, cls in kinds.items()}
    unknown = [type(m).__name__ for row in rows for _, m in row if not isinstance(m, tuple(kinds.values()))]
    if unknown:
        raise ValueError(f"collate_media: cannot batch {unknown[0]} parts")

    def owners(parts: list[list[tuple[int, Any]]]) -> torch.Tensor:
        docs = torch.full((len(parts), max(map(len, parts))), -1, dtype=torch.long)
        for r, row in enumerate(parts):
            docs[r, :len(row)] = torch.tensor([d for d, _ in row], dtype=torch.long)
        return docs

    images = per_kind["image"]
    if any(images):
        if max_tiles < 1:
            raise ValueError("collate_media: images need max_tiles >= 1 (the encoder's tile slots)")
        out["images"], out["aspect_ratios"] = stack_images([[(t.tiles, t.grid) for _, t in row] for row in images],
                                                           max_tiles)
        out["image_docs"] = owners(images)
    videos = per_kind["video"]
    if any(videos):
        if max_tiles < 1:
            raise ValueError("collate_media: videos need max_tiles >= 1 (the encoder's tile slots)")
        flat, ratios, mask = collate_videos([v.clip for row in videos for _, v in row], max_tiles, frames_per_group)
        n = max(map(len, videos))
        out["videos"] = flat.new_zeros(len(rows), n, *flat.shape[2:])
        out["video_aspect_ratios"] = ratios.new_zeros(len(rows), n, *ratios.shape[2:])
        out["frame_mask"] = mask.new_zeros(len(rows), n, mask.shape[2])
        at = 0
        for r, row in enumerate(videos):
            for j in range(len(row)):
                out["videos"][r, j], out["video_aspect_ratios"][r, j] = flat[at, 0], ratios[at, 0]
                out["frame_mask"][r, j] = mask[at, 0]
                at += 1
        out["video_docs"] = owners(videos)
    clips = [(d, a) for row in per_kind["audio"] for d, a in row]
    if clips:
        out["speech_feats"], out["speech_lengths"] = collate_features([a.feats for _, a in clips])
        out["speech_docs"] = torch.tensor([d for d, _ in clips], dtype=torch.long)
    return out


def stack_media(examples: list, max_tiles: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The `media` (tiled images) of examples → images `[batch, n_images, max_tiles, 3, S, S]`, aspect ratios
    `[batch, n_images, 2]`; (None, None) when no example holds an image."""
    from encoders.vision.transform import stack_images

    if not any(e.media for e in examples):
        return None, None
    return stack_images([[(t.tiles, t.grid) for t in e.media] for e in examples], max_tiles)

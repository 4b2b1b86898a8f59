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

Media live in the same sample as the record and are referenced from the messages: a content part
`{"type": "image", "member": "jpg"}` (or `"audio"` with e.g. `"flac"`) names a member of the sample
(`<key>.jpg`); without `member`, the sample's only member of that kind. A part naming a member the
sample lacks makes the record skipped and counted. A loader given `decode_media` hands each media
part's member to it (in message order) and keeps what it returns on the example (`media`); without
it, a dialog holding media is skipped and counted (a text model cannot read it). A packed SFT row
keeps each dialog's images beside it (`SFTBatch.images`, `image_docs`), so a dialog sees its own only.
An SFT loader may also read rankings as dialogs (`rankings=True`): the prompt and its best response.

Loaders run in the training process (dialogs are small JSON records; tokenising them is cheap) and
reuse the text pipeline's seeded walk over shards and weighted mix (`text_stream`, `mixing`). Their
position is that of the first record not yet delivered, so a resumed loader continues exactly.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .accounting import Counters, summarize
from .config import DataConfig, SourceConfig
from .mixing import Mixture, mixed_documents, start_position
from .shards import DataError, read_shard, source_shards
from .text_stream import SkipSample, SourceStream, derive_seed, sample_text

IGNORE = -100
MEDIA_MEMBERS = {"image": ("jpg", "jpeg", "png", "webp"), "audio": ("flac", "wav", "mp3", "ogg")}
MAX_IMAGE_PIXELS = 64 * 2**20  # as the image loaders: beyond this an image is a decompression bomb
STRENGTHS = ("significantly_better", "better", "slightly_better", "marginally_better")
STATE_FORMAT = "mm_llama.data.DialogLoader/1"


class Filtered(SkipSample):
    """A usable record the stage leaves out on purpose (e.g. a preference rated too weak): counted, not logged."""


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


def media_members(messages: list, media: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """`(kind, member)` of each media part of `messages` in order; SkipSample naming a part whose member
    the sample lacks (or, without `member`, when the sample has not exactly one member of that kind)."""
    out = []
    for i, part in enumerate(media_parts(messages)):
        kind = part.get("type")
        if kind not in MEDIA_MEMBERS:
            raise SkipSample(f"media part {i}: type {kind!r} is not one of text, {', '.join(MEDIA_MEMBERS)}")
        member = part.get("member")
        if member is None:
            found = [m for m in media if m.rsplit(".", 1)[-1] in MEDIA_MEMBERS[kind]]
            if len(found) != 1:
                raise SkipSample(f"media part {i} ({kind}) names no 'member' and the sample has {len(found)} "
                                 f"{kind} members ({', '.join(found) or 'none'})")
            member = found[0]
        elif not isinstance(member, str) or member.lower() not in media:
            raise SkipSample(f"media part {i} ({kind}) refers to member {member!r}, which the sample does not hold "
                             f"(has: {', '.join(sorted(media)) or 'none'})")
        out.append((kind, member.lower()))
    return out


def resolve_media(messages: list, media: Mapping[str, bytes], decode_media: Callable[[str, str, bytes], Any] | None
                  ) -> list:
    """The decoded media of `messages` in order (`decode_media(kind, member, bytes)`); SkipSample when the
    dialog holds media and there is no decoder (a text model), or when a member is missing or undecodable."""
    members = media_members(messages, media)
    if members and decode_media is None:
        raise SkipSample("the dialog holds media parts; a text model cannot read them")
    return [decode_media(kind, member, media[member]) for kind, member in members]


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

    def _fill(self) -> None:
        while self._next is None:
            record, position = next(self._docs)
            try:
                self._next = (self._encode(record, int(position["n"])), position)
            except Filtered:
                self.filtered += 1
            except SkipSample as e:
                self._counters.skip("sample", f"record {position['n']} at {position['cursors']}: {e}")

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

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")

    def _identity(self) -> dict:
        return {"kind": type(self).__name__, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "sources": [s.name for s in self.cfg.sources]}

    def _stream(self, encode) -> tuple[RecordStream, Counters]:
        counters = Counters.from_dict(self._stats)
        stream = RecordStream(self.cfg, encode, self.seed, self.rank, self.world_size, self._position, counters)
        stream.filtered = self._filtered
        return stream, counters

    def _delivered(self, stream: RecordStream, counters: Counters) -> None:
        self._position = stream.position
        self._stats = counters.to_dict()
        self._filtered = stream.filtered

    def state_dict(self) -> dict:
        """Plain dicts and numbers: the position of the next record and the counters."""
        return {"format": STATE_FORMAT, **self._identity(), "position": self._position, "stats": dict(self._stats),
                "filtered": self._filtered}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a dialog loader state (expected format {STATE_FORMAT!r})")
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._identity().items() if state.get(k) != v]
        if diff:
            raise ValueError("the data loader state was saved under different settings, so it cannot continue "
                             "exactly: " + "; ".join(diff))
        self._position, self._stats = state["position"], dict(state["stats"])
        self._filtered = int(state.get("filtered", 0))

    def load_state_dicts(self, states: list[dict]) -> None:
        """The states of all ranks; this loader continues from its own rank's (same number of ranks only)."""
        if len(states) != self.world_size:
            raise ValueError(f"dialog loaders resume with the same number of ranks: saved {len(states)}, "
                             f"now {self.world_size}")
        self.load_state_dict(states[self.rank])

    def stats(self) -> dict:
        """`skipped_samples`, `skipped_shards`, `documents` (records delivered), `packing_efficiency`, `tokens`,
        `filtered` (records left out on purpose)."""
        return {**summarize([Counters.from_dict(self._stats)]), "filtered": self._filtered}


@dataclass
class SFTBatch:
    """Packed dialogs. `tokens`, `labels` (-100: no loss), `doc_ids`: LongTensor `[batch, seq]`.

    With images (an image model's batch holding any): `images` `[batch, n_images, max_tiles, 3, S, S]`,
    `aspect_ratios` `[batch, n_images, 2]` (each row's images in `<|image|>` order, (0, 0): empty slot) and
    `image_docs` `[batch, n_images]`, the `doc_ids` value of the dialog each image belongs to (-1: empty)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor
    images: torch.Tensor | None = None
    aspect_ratios: torch.Tensor | None = None
    image_docs: torch.Tensor | None = None

    def to(self, device) -> "SFTBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SFTBatch(*(move(getattr(self, f)) for f in ("tokens", "labels", "doc_ids", "images",
                                                            "aspect_ratios", "image_docs")))


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


def pack_rows(examples: list[list[DialogExample]], seq_len: int, pad_id: int, max_tiles: int = 0) -> SFTBatch:
    """Whole dialogs side by side in rows of `seq_len`: one row per list entry of `examples`.

    The rest of a row is padding with its own document id and no labels. `doc_ids` number the dialogs
    of a row, so attention stays inside a dialog and positions restart at each. With `max_tiles`, the
    dialogs' images are stacked per row with that many tile slots, each tagged with its dialog's id.
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
    if not max_tiles or not any(e.media for row in examples for e in row):
        return SFTBatch(tokens, labels, doc_ids)
    from encoders.vision.transform import stack_images

    images, ratios = stack_images([[(t.tiles, t.grid) for e in row for t in e.media] for row in examples], max_tiles)
    image_docs = torch.full(ratios.shape[:2], -1, dtype=torch.long)
    for r, row in enumerate(examples):
        owners = [d for d, e in enumerate(row) for _ in e.media]
        image_docs[r, :len(owners)] = torch.tensor(owners, dtype=torch.long)
    return SFTBatch(tokens, labels, doc_ids, images, ratios, image_docs)


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
    decode_media: Callable[[str, str, bytes], Any] | None = None
    max_tiles: int = 0
    rankings: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {self.seq_len} and {self.batch_size}")
        if self.decode_media is not None and self.max_tiles < 1:
            raise ValueError("an SFT loader that decodes media needs max_tiles >= 1 (the encoder's tile slots)")

    def encode(self, record: Record, n: int) -> DialogExample:
        media_ok = self.decode_media is not None
        parse = ranking_dialog if self.rankings else parse_dialog
        messages = parse(read_record(record.text), media_ok=media_ok)
        try:
            dialog = self.chat.encode_dialog(messages)
        except ValueError as e:
            raise SkipSample(str(e)) from None
        if len(dialog) - 1 > self.seq_len:
            raise SkipSample(f"the dialog has {len(dialog)} tokens, more than a row of {self.seq_len} + 1")
        return dialog_example(dialog, resolve_media(messages, record.media, self.decode_media))

    def pack(self, rows: list[list[DialogExample]]) -> SFTBatch:
        return pack_rows(rows, self.seq_len, self.chat.tokenizer.pad_id, self.max_tiles)

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
    `media`: the loader's `decode_media`, `max_tiles` and `rankings` settings."""
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
    decode_media: Callable[[str, str, bytes], Any] | None = None  # (kind, member, bytes) -> decoded, or SkipSample

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


class ImageParts:
    """`decode_media` for image models: an image part's member → its tiles (`image_text.Tiled`), decoded and
    size-checked as the image loaders do; an undecodable image or an audio part is a SkipSample."""

    def __init__(self, tile_size: int, max_tiles: int):
        self.tile_size, self.max_tiles = tile_size, max_tiles

    def __call__(self, kind: str, member: str, data: bytes):
        from encoders.vision.transform import tile_image

        from .image_text import ImageError, Tiled, decode_image

        if kind != "image":
            raise SkipSample(f"member {member!r}: {kind} parts need a model with a {kind} encoder")
        try:
            pixels = decode_image(data, member.rsplit(".", 1)[-1], MAX_IMAGE_PIXELS)
        except ImageError as e:
            raise SkipSample(f"member {member!r}: {e}") from None
        tiles, grid = tile_image(pixels, self.tile_size, self.max_tiles)
        return Tiled(tiles, grid)


def stack_media(examples: list, max_tiles: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The `media` (tiled images) of examples → images `[batch, n_images, max_tiles, 3, S, S]`, aspect ratios
    `[batch, n_images, 2]`; (None, None) when no example holds an image."""
    from encoders.vision.transform import stack_images

    if not any(e.media for e in examples):
        return None, None
    return stack_images([[(t.tiles, t.grid) for t in e.media] for e in examples], max_tiles)

"""The vision adapter stages (SPEC §4.2): image pre-training and annealing of the composed image–text model.

The model is `MultimodalModel(model.lm, model.vision)`. Where its weights start:
- `init.from` a text stage (an LM): the LM's weights; the vision parts are new. Or `init.from` an
  earlier vision stage (a composed model, e.g. annealing after pre-training): every weight, with the
  encoder's positional embeddings resized when `model.vision.encoder.tile_size` grew (bicubic over the
  patch grid; the class token's row is kept).
- `train.options.encoder_from` a CLIP stage (`clip` objective): its image encoder, all but the
  projection, which here maps into the LM's width and starts fresh.
What trains is `train.trainable`/`train.frozen` (the stage configs freeze the LM). Each training
example is one image and one turn in the chat format, `<|image|>` + question → answer; the loss covers
the answer tokens only (ChatFormat's loss mask). The question is drawn per (sample, epoch) from the
sample's `qa` list (and its caption, under "Describe the image.", when `targets` includes `caption`).

Sources named in `train.options.documents` hold interleaved image-text documents instead
(`mm_llama.data.image_text`): an example is the whole document, `[bos] text <|image|> text ... [eos]`
with up to `max_images` images, each seen from its token to the next image token, and the loss covers
every text token (language modelling on the document). They mix with the pair sources by `weight`; a
batch may then hold several images per row (empty slots padded, aspect ratio (0, 0)).
Workers ship uint8 tiles; `ChatBatch.media_inputs` normalises them on the device.

Evaluation asks every held-out question: an answer is right when greedy decoding would produce exactly
its tokens and the end of turn. With the prompt and answer teacher-forced, that holds if and only if
the argmax at every answer position is the next answer token, so one forward pass decides it. Beside
each question type's accuracy are two image-blind baselines: chance (one over the type's possible
answers) and the majority answer's share of the held-out questions of that type.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from encoders.vision.transform import supported_aspect_ratios

from ...checkpoint.native import MODEL_SAFETENSORS, MODEL_YAML, is_run_dir, read_safetensors, run_dir_model
from ...config import ConfigError, ModelConfig, load_config
from ...data.demo_vision import ANSWERS
from ...data.image_text import (Document, DocumentSources, ImageLoader, Tiled, collate_images, encode_document,
                                heldout_examples, model_images, sample_caption, sample_metadata)
from ...data.text_stream import SkipSample
from ...model.multimodal import MultimodalModel
from ...text import ChatFormat
from ..losses import IGNORE, labelled_loss_sum, lm_loss_sum
from .base import Task, register
from .text_lm import load_init

CAPTION_PROMPT = "Describe the image."


def model_folder(path: str | Path) -> Path:
    """A native model folder: itself, or a run directory's `final/` (else its latest checkpoint)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such model folder or run directory")
    if is_run_dir(folder) and not (folder / MODEL_SAFETENSORS).is_file():
        return run_dir_model(folder)
    if not (folder / MODEL_SAFETENSORS).is_file():
        raise ConfigError(f"{folder}: no {MODEL_SAFETENSORS} (expected a model folder or a run directory)")
    return folder


def resize_positions(state: dict[str, torch.Tensor], prefix: str, grid: int) -> dict[str, torch.Tensor]:
    """Resample the encoder's positional tables in `state` (keys under `prefix`) to a `grid × grid` patch grid.

    `vit.positional_embedding` `[1 + g², width]` and `tile_position_embedding` `[grids, tiles, 1 + g², width]`:
    row 0 (the class token) is kept, the g × g patch rows are interpolated bicubically. (open_clip's own
    `resize_pos_embed` handles only the first table, inside a whole-model state dict.)
    """
    out = dict(state)
    for key in (f"{prefix}vit.positional_embedding", f"{prefix}tile_position_embedding"):
        if key not in state:
            continue
        t = state[key]
        old = round((t.shape[-2] - 1) ** 0.5)
        if old == grid:
            continue
        if old * old + 1 != t.shape[-2]:
            raise ValueError(f"{key}: {t.shape[-2]} rows is not 1 + a square number of patches")
        lead, width = t.shape[:-2], t.shape[-1]
        flat = t.reshape(-1, old * old + 1, width).float()
        patches = flat[:, 1:].reshape(-1, old, old, width).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(-1, grid * grid, width)
        out[key] = torch.cat([flat[:, :1], patches], dim=1).reshape(*lead, grid * grid + 1, width).to(t.dtype)
    return out


TILE_TABLES = ("pre_tile_embedding", "tile_position_embedding", "post_tile_embedding")


def shrink_tiles(state: dict[str, torch.Tensor], prefix: str, max_tiles: int) -> dict[str, torch.Tensor]:
    """Cut the encoder's tile tables in `state` (keys under `prefix`) down to `max_tiles` tiles per image.

    The tables `[1 + aspect ratios, tiles, ...]` have a row per tile grid (`supported_aspect_ratios` order, row 0 =
    empty slot); a model allowing fewer tiles keeps the rows of the grids it still supports and their first
    `max_tiles` tiles, the entries those grids were trained with (e.g. an image model's encoder for one-tile
    video frames). Tables for as many tiles or fewer are left alone (a larger model must not invent rows).
    """
    out = dict(state)
    for name in TILE_TABLES:
        key = f"{prefix}{name}"
        if key not in state or state[key].shape[1] <= max_tiles:
            continue
        table, old = state[key], state[key].shape[1]
        if table.shape[0] != len(supported_aspect_ratios(old)) + 1:
            raise ValueError(f"{key}: {table.shape[0]} rows do not fit {old} tiles' aspect ratios")
        row = {grid: i for i, grid in enumerate(supported_aspect_ratios(old), start=1)}
        keep = [0, *(row[grid] for grid in supported_aspect_ratios(max_tiles))]
        out[key] = table[keep, :max_tiles].clone()
    return out


def load_encoder(model: MultimodalModel, source: str | Path) -> None:
    """The image encoder of a CLIP stage (or any saved model with `vision.*` keys), all but its projection."""
    folder = model_folder(source)
    path = folder / MODEL_SAFETENSORS
    state = {k.removeprefix("vision."): v for k, v in read_safetensors(path).items()
             if k.startswith("vision.") and not k.startswith("vision.projection.")}
    if not state:
        raise ConfigError(f"{path}: holds no image encoder ('vision.*' keys)")
    state = shrink_tiles(resize_positions(state, "", model.vision.args.grid), "", model.vision.args.max_num_tiles)
    expected = {k: v.shape for k, v in model.vision.state_dict().items() if not k.startswith("projection.")}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ConfigError(f"{path}: its encoder does not fit model.vision.encoder (missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}, other shapes {sorted(wrong)[:4]}): width, layers, heads, patch_size, "
                          f"max_num_tiles and n_global_layers must match the CLIP stage")
    model.vision.load_state_dict(state, strict=False)


def load_composed(model: MultimodalModel, folder: Path, fresh: tuple[str, ...] = (),
                  state: dict[str, torch.Tensor] | None = None) -> None:
    """Every weight of a saved composed model, positional tables resized to this model's tile grid (and its tile
    tables cut to its `max_num_tiles`, `shrink_tiles`).

    Keys under a prefix in `fresh` may be absent from the file (parts this stage adds, e.g. the video adapter's);
    they keep their initialisation. `state`: the file's tensors, already read (and adjusted) by the caller.
    """
    path = folder / MODEL_SAFETENSORS
    state = resize_positions(read_safetensors(path) if state is None else state, "vision.", model.vision.args.grid)
    state = shrink_tiles(state, "vision.", model.vision.args.max_num_tiles)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    missing = [k for k in missing if not k.startswith(fresh)] if fresh else missing
    wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k])
    # With tied embeddings the output matrix is stored once, under tok_embeddings.
    missing = [k for k in missing if not (k == "lm.output.weight" and model.args.tie_embeddings)]
    if missing or unexpected or wrong:
        raise ConfigError(f"init.from {path}: does not fit the stage's model (missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}, other shapes {wrong[:4]})")
    model.load_state_dict(state, strict=False)


class VisionLMOptions(BaseModel):
    """`train.options` the image and video stages share."""

    model_config = ConfigDict(extra="forbid")

    encoder_from: str | None = Field(None, description="a CLIP stage's run dir (or model folder): the encoder's start")
    targets: list[Literal["qa", "caption"]] = Field(default_factory=lambda: ["qa"], min_length=1,
                                                    description="what an example asks: a qa pair and/or the caption")


class ImageLMOptions(VisionLMOptions):
    """`train.options` of the `vision_lm` objective: the shared ones and the interleaved-document sources."""

    documents: list[str] = Field(default_factory=list, description="names of data.sources whose shards hold "
                                 "interleaved image-text documents (the other sources hold image-text pairs)")
    max_images: int = Field(4, gt=0, description="images kept per interleaved document; it is cut before the next")


@dataclass
class ChatExample:
    """One image (or video clip) and one chat turn. `tokens`/`loss_mask` cover the whole dialog (ChatFormat)."""

    media: Tiled
    tokens: list[int]
    loss_mask: list[bool]
    kind: str  # question type ("colour", ...; "caption")
    answer: str
    caption: list[int] = field(default_factory=list)  # the sample's caption tokens, when asked for (`captions=True`)


@dataclass
class DocumentExample:
    """An interleaved document: its images in order and its tokens (one `<|image|>` per image); text tokens are targets."""

    media: list[Tiled]
    tokens: list[int]
    loss_mask: list[bool]
    kind: str = "document"
    answer: str = ""


@dataclass
class ChatBatch:
    """tokens, labels `[batch, seq]` (labels −100 off the targets), images `[batch, n_images, tiles, 3, S, S]` (uint8
    from the training loader, float normalised from `heldout`), ratios `[batch, n_images, 2]`; n_images is 1 for
    image-text pairs and the most images of any row when the batch holds documents."""

    tokens: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor
    aspect_ratios: torch.Tensor
    kinds: list[str]
    answers: list[str]

    def media_inputs(self, device) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for this batch's media (uint8 images normalised on `device`)."""
        ratios = self.aspect_ratios.to(device)
        return {"images": model_images(self.images.to(device), ratios), "aspect_ratios": ratios}


def sample_questions(sample: dict, targets: list[str]) -> list[tuple[str, str, str]]:
    """`(type, question, answer)` the sample offers for `targets`; SkipSample when it offers none."""
    meta = sample_metadata(sample)
    found = []
    if "qa" in targets:
        qa = meta.get("qa", [])
        for item in qa if isinstance(qa, list) else []:
            if isinstance(item, dict) and all(isinstance(item.get(k), str) and item[k].strip() for k in ("question", "answer")):
                found.append((str(item.get("type", "qa")), item["question"], item["answer"]))
    if "caption" in targets:
        text = sample_caption(sample, meta)
        if text is not None:
            found.append(("caption", CAPTION_PROMPT, text))
    if not found:
        raise SkipSample(f"no question for targets {targets} (json qa list / caption)")
    return found


class ChatExamples:
    """A shard sample → one `ChatExample` (drawn by `seed`), or all of them (`every=True`, for evaluation).

    `media` is the chat part the sample's image or clip becomes: `image` (`<|image|>`) or `video` (`<|video|>`).
    `captions=True` also gives every example its sample's caption tokens (empty when it has none).
    """

    def __init__(self, tokenizer, targets: list[str], max_len: int, every: bool = False, media: str = "image",
                 captions: bool = False):
        self.chat, self.targets, self.max_len, self.every = ChatFormat(tokenizer), list(targets), max_len, every
        self.media, self.captions = media, captions

    def _example(self, image: Tiled, kind: str, question: str, answer: str) -> ChatExample:
        dialog = self.chat.encode_dialog([
            {"role": "user", "content": [{"type": self.media}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer},
        ])
        if len(dialog) > self.max_len + 1:
            raise SkipSample(f"{len(dialog)} tokens, more than train.seq_len + 1 = {self.max_len + 1}")
        return ChatExample(image, dialog.tokens, dialog.loss_mask, kind, answer)

    def __call__(self, sample: dict, image: Tiled, seed: int):
        found = sample_questions(sample, self.targets)
        examples = [self._example(image, *q) for q in (found if self.every else [found[seed % len(found)]])]
        if self.captions:
            text = sample_caption(sample, sample_metadata(sample))
            caption = self.chat.tokenizer.encode(text, bos=False, eos=False) if text else []
            for e in examples:
                e.caption = caption
        return examples if self.every else examples[0]


class DocumentExamples:
    """An interleaved document (`Document`) → `DocumentExample` of at most `max_len + 1` tokens; runs in the workers."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, sample: dict, document: Document, seed: int) -> DocumentExample:
        tokens, mask, images = encode_document(document, self.tokenizer, self.max_len + 1)
        return DocumentExample(images, tokens, mask)


def pad_chat(examples: list[ChatExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and next-token labels `[batch, longest - 1]`, right-padded; labels IGNORE where the loss mask is off."""
    length = max(len(e.tokens) for e in examples) - 1
    tokens = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids = torch.tensor(e.tokens)
        tokens[i, : len(ids) - 1] = ids[:-1]
        labels[i, : len(ids) - 1] = torch.where(torch.tensor(e.loss_mask[1:]), ids[1:], IGNORE)
    return tokens, labels


class CollateChat:
    """Right-pads the dialogs (and documents) of a batch to its longest; labels are the next token where the loss
    mask is set."""

    def __init__(self, pad_id: int, max_tiles: int):
        self.pad_id, self.max_tiles = pad_id, max_tiles

    def __call__(self, examples: list[ChatExample]) -> ChatBatch:
        tokens, labels = pad_chat(examples, self.pad_id)
        images, ratios = collate_images([e.media for e in examples], self.max_tiles)
        return ChatBatch(tokens, labels, images, ratios, [e.kind for e in examples], [e.answer for e in examples])


class MediaChatTask(Task):
    """What the image and video stages share: the composed model started from a text LM or a composed run (plus
    a CLIP encoder), chat batches whose answer tokens carry the loss, media passed by the batch's `media_inputs`.
    Subclasses say which model they build (`fresh_model`) and how a composed run starts it (`start_from_composed`)."""

    def check_start_paths(self) -> None:
        for path, what in ((self.cfg.init.from_, "init.from"), (self.opts.encoder_from, "train.options.encoder_from")):
            if path is not None and not Path(path).is_dir():
                raise ConfigError(f"{what}: {path} is not a run directory or model folder")

    def fresh_model(self) -> MultimodalModel:
        return MultimodalModel(self.cfg.model.lm, self.cfg.model.vision)

    def start_from_composed(self, model: MultimodalModel, folder: Path) -> None:
        load_composed(model, folder)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.run.seed)
        model = self.fresh_model()
        if self.cfg.init.from_ is not None:
            folder = model_folder(self.cfg.init.from_)
            source = load_config(ModelConfig, folder / MODEL_YAML)
            if source.vision is not None:
                self.start_from_composed(model, folder)
            else:
                load_init(model.lm, str(folder))
                with torch.no_grad():  # the image token's own row starts as the loaded LM's
                    model.image_embedding.weight[0].copy_(model.lm.tok_embeddings.weight[model.image_token_id])
        if self.opts.encoder_from is not None:
            load_encoder(model, self.opts.encoder_from)
        return model

    def blocks(self, model: MultimodalModel) -> list[nn.Module]:
        return list(model.lm.layers)

    def count(self, batch) -> int:
        return int((batch.labels != IGNORE).sum())

    def loss(self, model, batch, device) -> torch.Tensor:
        return labelled_loss_sum(model, batch.tokens.to(device), batch.labels.to(device), **batch.media_inputs(device))

    def batch_tokens(self, batch) -> int:
        return batch.tokens.numel()


@register("vision_lm")
class VisionLM(MediaChatTask):
    """Trains the image encoder, cross-attention and image embedding of `MultimodalModel` on image–text turns."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts = self.options(ImageLMOptions)
        if cfg.model.vision is None:
            raise ConfigError(f"stage '{cfg.name}': the vision_lm objective needs a model with a vision: section")
        self.encoder = cfg.model.vision.encoder
        names = {s.name for s in cfg.data.sources}
        unknown = [n for n in self.opts.documents if n not in names]
        if unknown:
            held = {s.name for s in cfg.data.heldout}
            why = " (held-out sources are asked questions; documents are training data)" if set(unknown) & held else ""
            raise ConfigError(f"train.options.documents: {unknown} are not data.sources names "
                              f"({', '.join(sorted(names))}){why}")

    def check(self) -> None:
        self.check_data()
        image_id = self.cfg.model.vision.image_token_for(self.cfg.model.lm.vocab_size)
        if image_id != self.tokenizer.image_id:
            raise ConfigError(f"model.vision.image_token_id is {image_id} but the tokenizer's <|image|> is "
                              f"{self.tokenizer.image_id} ({self.cfg.data.tokenizer_path})")
        self.check_start_paths()

    def _collate(self) -> CollateChat:
        return CollateChat(self.tokenizer.pad_id, self.encoder.max_num_tiles)

    def loader(self, seq_len, batch_size, rank, world_size):
        documents = None
        if self.opts.documents:
            documents = DocumentSources(tuple(self.opts.documents), DocumentExamples(self.tokenizer, seq_len),
                                        self.opts.max_images)
        return ImageLoader(self.cfg.data, ChatExamples(self.tokenizer, self.opts.targets, seq_len), self._collate(),
                           batch_size=batch_size, seed=self.cfg.run.seed, tile_size=self.encoder.tile_size,
                           max_tiles=self.encoder.max_num_tiles, rank=rank, world_size=world_size, uint8=True,
                           documents=documents)

    def heldout(self, seq_len, batch_size) -> list:
        """Every question of the held-out images, up to `train.eval_batches` batches."""
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        limit = batch_size * self.cfg.train.eval_batches
        examples, _ = heldout_examples(self.cfg.data, ChatExamples(self.tokenizer, self.opts.targets, seq_len, every=True),
                                       tile_size=self.encoder.tile_size, max_tiles=self.encoder.max_num_tiles,
                                       seed=self.cfg.run.seed, limit=limit)
        flat = [e for group in examples for e in group][:limit]
        collate = self._collate()
        return [collate(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return answer_accuracy(model, batches, device, autocast)


def answer_accuracy(model: MultimodalModel, batches: list[ChatBatch], device, autocast, prefix: str = "val",
                    choices: dict[str, tuple[str, ...]] = ANSWERS) -> dict[str, float]:
    """`val_loss` per answer token, and per question type `<prefix>_acc_<type>`, `<prefix>_chance_<type>` (one over
    `choices[type]`, else over the answers seen) and `<prefix>_majority_<type>`. Batches give `media_inputs(device)`."""
    was_training = model.training
    model.eval()
    right: Counter = Counter()
    asked: Counter = Counter()
    answers: dict[str, Counter] = {}
    total, units = 0.0, 0
    with torch.no_grad():
        for b in batches:
            labels = b.labels.to(device)
            with autocast():
                logits = model(b.tokens.to(device), **b.media_inputs(device))
            total += float(lm_loss_sum(logits, labels))
            units += int((labels != IGNORE).sum())
            hit = ((logits.argmax(-1) == labels) | (labels == IGNORE)).all(dim=1)
            for kind, answer, ok in zip(b.kinds, b.answers, hit.tolist()):
                asked[kind] += 1
                right[kind] += ok
                answers.setdefault(kind, Counter())[answer] += 1
    model.train(was_training)
    out = {"val_loss": total / max(units, 1)}
    for kind in sorted(asked):
        out[f"{prefix}_acc_{kind}"] = right[kind] / asked[kind]
        n_answers = len(choices[kind]) if kind in choices else len(answers[kind])
        out[f"{prefix}_chance_{kind}"] = 1 / n_answers
        out[f"{prefix}_majority_{kind}"] = answers[kind].most_common(1)[0][1] / asked[kind]
    return out

"""Pipeline stages of the composed models: image–text, video and speech (see `pipeline.py` for the machinery).

Each is cut along its LM layers as the text LM is (`split_layers`), keeps the whole model's names
(`lm.layers.{i}`, `cross_attention.{i}`, `vision.*`, `speech_encoder.*`, ...) so a checkpoint loads at any
layout, and puts every media encoder on the first stage only, which computes the input embeddings.

Image–text (`MultimodalStage`, vision_lm): a gated cross-attention block travels with the LM layer it runs
before. The first stage sends the encoder's output (the image tokens, in the LM's width) down the pipeline
beside the hidden state; each stage computes the K/V of its own cross-attention blocks from them. Why not the
paper's choice (the encoder replicated on every stage, SPEC §4.1 "Load balancing")? With one owner every
encoder weight has one gradient, one optimizer state and one checkpoint entry, as at every other layout, and
the encoder runs once per micro-batch instead of once per stage; the price is the image tokens' traffic (at
the paper's 2,308 image tokens against 192 text tokens, about 13× the hidden state's) and the encoder's work
on the first stage, which the layer split does not weigh.

Video (`VideoStage`, video_lm): the same with the aggregated frames. The first stage runs the image encoder
and the temporal aggregator (`MultimodalModel.encode_videos`) and sends the aggregated tokens, padded to the
most groups a clip can have (`max_frames // frames_per_group`; a padded group is seen by no token), so the
buffers keep one shape. Later stages rebuild the group mask from the batch's frames.

Speech (`SpeechStage`, speech_lm and speech SFT): no cross-attention. The Conformer and the adapter live on the
first stage, whose output is the hidden state after its layers, the adapter frames spliced over the
`<|speech|>` placeholders before them; later stages are plain LM layers. The clips stay on the first stage's
rank: its queue splits them by the rows of each micro-batch (clips are in reading order, one per span).
"""
from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F
from torch import nn

from adapters.cross_attention import cross_attention_bias, vision_mask
from adapters.speech import speech_spans
from adapters.video import video_mask

from ..model.multimodal import MultimodalModel
from ..model.speech_lm import SpeechLM
from .pipeline import PipelineShape, StageModule, fixed_doc_ids, fixed_tokens, pad_rows, take


def _reads(logits: torch.Tensor, media: torch.Tensor, used: bool) -> torch.Tensor:
    """The last stage's logits; when it holds no cross-attention block, tied to the media tokens it received with
    weight 0: the schedule sends back a gradient for every tensor a stage received (zeros, here). A stage between
    returns the media tokens it does not read as they came, so their gradient passes through it."""
    return logits if used else logits + 0 * media.sum()


class MultimodalStage(nn.Module):
    """One pipeline stage of an image–text `MultimodalModel`: the first takes tokens `[batch, seq]` and images
    `[batch, n_images, tiles, 3, S, S]`; every stage but the last returns the hidden state `[batch, seq, dim]`
    and the image tokens `[batch, n_images, tiles, tokens_per_tile, dim]`; the last returns logits
    `[batch, seq, vocab]`. Tokens and aspect ratios of each micro-batch are queued (`queue`)."""

    embed = MultimodalModel.embed
    shapes_known = False

    def __init__(self, model: MultimodalModel, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.args, self.first, self.last = model.args, first, last
        self.image_token_id, self.max_tiles = model.image_token_id, model.config.encoder.max_num_tiles
        self.lm = StageModule(model.lm, layer_ids, first, last)
        self.cross_attention = nn.ModuleDict({str(i): model.cross_attention[str(i)] for i in layer_ids
                                              if str(i) in model.cross_attention})
        self.vision = model.vision if first else None
        self.image_embedding = model.image_embedding if first else None
        self.inputs: deque = deque()

    def step_inputs(self, batch, shape: PipelineShape, device) -> tuple[tuple, torch.Tensor, tuple]:
        """An image–text batch (`tokens`, `labels`, `media_inputs`) padded to `shape`, its images to
        `shape.image_slots` empty slots (aspect ratio (0, 0), seen by no token) → the first stage's arguments
        (tokens, images), the targets, what every stage queues (tokens, aspect ratios)."""
        media = batch.media_inputs(device)
        tokens, labels = fixed_tokens(batch.tokens, batch.labels, shape)
        images, ratios = media["images"], media["aspect_ratios"]
        n = images.shape[1]
        if n > shape.image_slots:
            raise ValueError(f"a batch of {n} images per row does not fit the pipeline's {shape.image_slots} "
                             "image slots")
        images = pad_rows(F.pad(images, (0, 0) * (images.ndim - 2) + (0, shape.image_slots - n)), shape.rows)
        ratios = pad_rows(F.pad(ratios, (0, 0, 0, shape.image_slots - n)), shape.rows)
        tokens, labels = tokens.to(device), labels.to(device)
        return (tokens, images), labels, (tokens, ratios)

    def queue(self, local: tuple, microbatches: int) -> None:
        self.inputs = deque(zip(*(t.tensor_split(microbatches) for t in local)))

    def forward(self, x: torch.Tensor, media: torch.Tensor):
        tokens, ratios = take(self, self.inputs)
        if self.first:
            h, image_tokens = self.embed(tokens), self.vision(media, ratios)
        else:
            h, image_tokens = x, media
        (cos, sin), mask = self.lm.prepare(tokens)
        allowed = vision_mask(tokens, self.image_token_id, ratios, self.max_tiles)
        bias, rows = cross_attention_bias(allowed, image_tokens.shape[3], h.dtype)
        flat = image_tokens.flatten(1, 3)
        for i, layer in self.lm.layers.items():
            if i in self.cross_attention:
                block = self.cross_attention[i]
                h = block(h, block.kv(flat), bias, rows)
            h = layer(h, cos, sin, mask)
        if self.last:
            return _reads(self.lm.output(self.lm.norm(h)).float(), image_tokens, bool(self.cross_attention))
        return h, image_tokens


class VideoStage(MultimodalStage):
    """One pipeline stage of a video `MultimodalModel` on clips (video_lm; no images): the first takes tokens
    `[batch, seq]` (the clips are queued); every stage but the last returns the hidden state and the aggregated
    frames `[batch, n_videos, max_groups, n_latents, dim]`; the last returns logits. The image parts are held
    (their checkpoint keys) but not run, as in `MultimodalModel.forward` without images."""

    encode_videos = MultimodalModel.encode_videos

    def __init__(self, model: MultimodalModel, layer_ids: list[int], first: bool, last: bool):
        super().__init__(model, layer_ids, first, last)
        self.video_config, self.video_token_id = model.video_config, model.video_token_id
        self.max_groups = model.video_config.max_frames // model.video_config.frames_per_group
        self.video_cross_attention = nn.ModuleDict({str(i): model.video_cross_attention[str(i)] for i in layer_ids
                                                    if str(i) in model.video_cross_attention})
        self.video_aggregator = model.video_aggregator if first else None

    def step_inputs(self, batch, shape: PipelineShape, device) -> tuple[tuple, torch.Tensor, tuple]:
        """A video batch (`tokens`, `labels`, `media_inputs`) padded to `shape` → the first stage's tokens, the
        targets, what every stage queues: tokens, the group mask bool `[batch, n_videos, max_groups]` (as the
        aggregator's: a group is real when one of its frames is), videos, aspect ratios and frame mask."""
        media = batch.media_inputs(device)
        tokens, labels = fixed_tokens(batch.tokens, batch.labels, shape)
        videos, ratios, frames = (pad_rows(media[k], shape.rows)
                                  for k in ("videos", "video_aspect_ratios", "frame_mask"))
        b, v, f = frames.shape
        per_group = self.video_config.frames_per_group
        if f // per_group > self.max_groups:
            raise ValueError(f"a batch of {f} frames per clip does not fit model.video.max_frames "
                             f"({self.video_config.max_frames})")
        real = (frames & (ratios.prod(-1) > 0)).view(b, v, f // per_group, per_group).any(-1)
        groups = torch.cat([real, real.new_zeros(b, v, self.max_groups - f // per_group)], 2)
        tokens, labels = tokens.to(device), labels.to(device)
        return (tokens,), labels, (tokens, groups, videos, ratios, frames)

    def forward(self, x: torch.Tensor, media: torch.Tensor | None = None):
        tokens, groups, videos, ratios, frames = take(self, self.inputs)
        if self.first:
            context = self.encode_videos(videos, ratios, frames)  # K/V of this stage's blocks included
            h, kv, groups = self.embed(tokens), context.kv, context.group_mask
            media = F.pad(context.tokens, (0, 0, 0, 0, 0, self.max_groups - context.tokens.shape[2]))
        else:
            h, flat = x, media.flatten(1, 3)
            kv = {i: block.kv(flat) for i, block in self.video_cross_attention.items()}
        bias, rows = cross_attention_bias(video_mask(tokens, self.video_token_id, groups), media.shape[3], h.dtype)
        (cos, sin), mask = self.lm.prepare(tokens)
        for i, layer in self.lm.layers.items():
            if i in self.video_cross_attention:
                h = self.video_cross_attention[i](h, kv[i], bias, rows)
            h = layer(h, cos, sin, mask)
        if self.last:
            return _reads(self.lm.output(self.lm.norm(h)).float(), media, bool(self.video_cross_attention))
        return h, media


class SpeechStage(nn.Module):
    """One pipeline stage of `SpeechLM`: tokens `[batch, seq]` (first stage; the clips' log-mels are queued) or
    the hidden state `[batch, seq, dim]` in; hidden state out, or logits `[batch, seq, vocab]` on the last."""

    embed = SpeechLM.embed
    encode_speech = SpeechLM.encode_speech
    shapes_known = False

    def __init__(self, model: SpeechLM, layer_ids: list[int], first: bool, last: bool):
        super().__init__()
        self.args, self.first, self.last, self.speech_ids = model.args, first, last, model.speech_ids
        self.lm = StageModule(model.lm, layer_ids, first, last)
        self.speech_encoder = model.speech_encoder if first else None
        self.speech_adapter = model.speech_adapter if first else None
        self.inputs: deque = deque()

    def step_inputs(self, batch, shape: PipelineShape, device) -> tuple[tuple, torch.Tensor, tuple]:
        """A `speech_lm` batch (`tokens`, `labels`, `feats`, `feat_lengths`) or a speech SFT batch (`doc_ids`,
        `speech_feats`, `speech_lengths`) padded to `shape` (a repeated row repeats its clips) → the first stage's
        tokens, the targets, what every stage queues: tokens, doc_ids (or None), clips per row `[batch]`, log-mels
        `[n_clips, frames, n_mels]` and lengths `[n_clips]` (or None)."""
        doc_ids = getattr(batch, "doc_ids", None)
        if doc_ids is None:
            feats, lengths = batch.feats, batch.feat_lengths
        else:
            feats, lengths = batch.speech_feats, batch.speech_lengths
        n = batch.tokens.shape[0]
        per_row = torch.bincount(torch.tensor([row for row, _, _ in speech_spans(batch.tokens, self.speech_ids)],
                                              dtype=torch.long), minlength=n)
        if feats is not None and n < shape.rows:  # the repeated last row's clips
            last = torch.arange(len(feats) - int(per_row[-1]), len(feats))
            keep = torch.cat([torch.arange(len(feats)), last.repeat(shape.rows - n)])
            feats, lengths = feats[keep], lengths[keep]
        per_row = pad_rows(per_row, shape.rows)
        tokens, labels = fixed_tokens(batch.tokens, batch.labels, shape)
        if doc_ids is not None:
            doc_ids = fixed_doc_ids(doc_ids, shape).to(device)
        if feats is not None:
            feats, lengths = feats.to(device), lengths.to(device)
        tokens, labels = tokens.to(device), labels.to(device)
        return (tokens,), labels, (tokens, doc_ids, per_row, feats, lengths)

    def queue(self, local: tuple, microbatches: int) -> None:
        tokens, doc_ids, per_row, feats, lengths = local
        parts = [tokens.tensor_split(microbatches),
                 doc_ids.tensor_split(microbatches) if doc_ids is not None else [None] * microbatches]
        sizes = [int(c.sum()) for c in per_row.tensor_split(microbatches)]
        clips = zip(feats.split(sizes), lengths.split(sizes)) if feats is not None else [None] * microbatches
        self.inputs = deque(zip(*parts, clips))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, doc_ids, clips = take(self, self.inputs)
        if self.first:
            speech = self.encode_speech(*clips) if clips is not None and len(clips[0]) else None
            h = self.embed(tokens, speech)  # the queued tokens: shape inference passes zeros as x
        else:
            h = x
        return self.lm.run_layers(h, tokens, doc_ids)

"""The video stages (SPEC §4.2 "Video pre-training", "Video SFT"): the video adapter of the composed model.

The model is `MultimodalModel(model.lm, model.vision, model.video)`. `init.from` is an image stage (its
every weight; the aggregator and the video cross-attention start fresh, gates at zero, so the model starts
as the image model exactly) or an earlier video stage (every weight; the aggregator's time embedding and time gain are
resized linearly when `model.video.max_frames` changed, e.g. 16 frames in pre-training → 64 in SFT). The
stage configs train only `video_aggregator.*` and `video_cross_attention.*`, as the paper does.

Each example is one clip and one chat turn, `<|video|>` + question → answer, loss on the answer only;
up to `max_frames` frames sampled uniformly (`mm_llama.data.video`). Evaluation is `vision_lm`'s greedy
answer match per question type, reported as `val_video_acc_<type>` beside the blind baselines
`val_video_chance_<type>` and `val_video_majority_<type>`.

`train.options.caption_contrastive` (ours, off by default; not in the paper) adds a video–caption contrastive
loss on the aggregator's output: the mean of a clip's aggregated tokens against the mean of its caption's
(frozen) LM token embeddings, symmetric InfoNCE over the micro-batch, equal captions counting as positives.
Why: the answer loss reaches the aggregator only through the frozen LM, and on the demo it never made the
aggregated tokens carry motion consistently enough for the video cross-attention to read it (colour and shape,
which dominate the tokens, were learned; see docs/ARCHITECTURE.md, Video). A caption names what, how and where
to at once, so the contrastive term asks for a code that is the same for every clip of one description.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from adapters.video import resize_time_embedding

from ...checkpoint.native import MODEL_SAFETENSORS, read_safetensors
from ...config import ConfigError
from ...data.demo_video import ANSWERS
from ...data.video import Clip, VideoLoader, collate_videos, heldout_video_examples
from ...model.multimodal import MultimodalModel
from ..losses import IGNORE, caption_contrastive_loss, labelled_loss_sum
from .base import register
from .vision_lm import (ChatExample, ChatExamples, MediaChatTask, VisionLMOptions, answer_accuracy, load_composed,
                        pad_chat)

VIDEO_PARTS = ("video_aggregator.", "video_cross_attention.")
TIME_TABLES = ("video_aggregator.time_embedding", "video_aggregator.time_gain")


class VideoLMOptions(VisionLMOptions):
    """`train.options` of the video stages: the image stages' ones and the caption-contrastive term (module doc)."""

    caption_contrastive: float = Field(0.0, ge=0, description="weight of the video–caption contrastive loss "
                                       "(per labelled token of the batch's answers); 0 = off, as the paper")
    contrastive_temperature: float = Field(0.1, gt=0, description="temperature of that loss's cosine similarities")


@dataclass
class VideoBatch:
    """tokens, labels `[batch, seq]`; videos `[batch, 1, frames, tiles, 3, S, S]`, aspect ratios `[batch, 1, frames, 2]`,
    frame_mask `[batch, 1, frames]` (frames padded to a multiple of `frames_per_group`)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    videos: torch.Tensor
    aspect_ratios: torch.Tensor
    frame_mask: torch.Tensor
    kinds: list[str]
    answers: list[str]
    captions: list[list[int]]

    def media_inputs(self, device) -> dict[str, torch.Tensor]:
        return {"videos": self.videos.to(device), "video_aspect_ratios": self.aspect_ratios.to(device),
                "frame_mask": self.frame_mask.to(device)}


class CollateVideoChat:
    """Right-pads the dialogs of a batch to its longest; labels are the next token where the loss mask is set."""

    def __init__(self, pad_id: int, max_tiles: int, frames_per_group: int):
        self.pad_id, self.max_tiles, self.frames_per_group = pad_id, max_tiles, frames_per_group

    def __call__(self, examples: list[ChatExample]) -> VideoBatch:
        tokens, labels = pad_chat(examples, self.pad_id)
        clips: list[Clip] = [e.media for e in examples]
        videos, ratios, mask = collate_videos(clips, self.max_tiles, self.frames_per_group)
        return VideoBatch(tokens, labels, videos, ratios, mask, [e.kind for e in examples], [e.answer for e in examples],
                          [e.caption for e in examples])


def load_video_start(model: MultimodalModel, folder: Path) -> None:
    """`init.from` a composed model: an image model (video parts stay fresh) or a video model (time tables resized)."""
    state = read_safetensors(folder / MODEL_SAFETENSORS)
    for name in TIME_TABLES:
        if name in state:
            state[name] = resize_time_embedding(state[name], model.video_config.max_frames)
    load_composed(model, folder, fresh=VIDEO_PARTS, state=state)


@register("video_lm")
class VideoLM(MediaChatTask):
    """Trains the video adapter (aggregator + video cross-attention) of `MultimodalModel` on video–text turns."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts = self.options(VideoLMOptions)
        if cfg.model.video is None:
            raise ConfigError(f"stage '{cfg.name}': the video_lm objective needs a model with vision: and video: sections")
        self.encoder, self.video = cfg.model.vision.encoder, cfg.model.video

    def check(self) -> None:
        self.check_data()
        video_id = self.video.video_token_for(self.cfg.model.lm.vocab_size)
        if video_id != self.tokenizer.video_id:
            raise ConfigError(f"model.video.video_token_id is {video_id} but the tokenizer's <|video|> is "
                              f"{self.tokenizer.video_id} ({self.cfg.data.tokenizer_path})")
        self.check_start_paths()

    def fresh_model(self) -> MultimodalModel:
        return MultimodalModel(self.cfg.model.lm, self.cfg.model.vision, self.video)

    def start_from_composed(self, model: MultimodalModel, folder: Path) -> None:
        load_video_start(model, folder)

    def _examples(self, seq_len: int, every: bool = False) -> ChatExamples:
        return ChatExamples(self.tokenizer, self.opts.targets, seq_len, every=every, media="video",
                            captions=self.opts.caption_contrastive > 0)

    def _collate(self) -> CollateVideoChat:
        return CollateVideoChat(self.tokenizer.pad_id, self.encoder.max_num_tiles, self.video.frames_per_group)

    def loader(self, seq_len, batch_size, rank, world_size):
        return VideoLoader(self.cfg.data, self._examples(seq_len), self._collate(), batch_size=batch_size,
                           seed=self.cfg.run.seed, tile_size=self.encoder.tile_size, max_tiles=self.encoder.max_num_tiles,
                           max_frames=self.video.max_frames, rank=rank, world_size=world_size)

    def heldout(self, seq_len, batch_size) -> list:
        """Every question of the held-out clips, up to `train.eval_batches` batches."""
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        limit = batch_size * self.cfg.train.eval_batches
        examples, _ = heldout_video_examples(self.cfg.data, self._examples(seq_len, every=True),
                                             tile_size=self.encoder.tile_size, max_tiles=self.encoder.max_num_tiles,
                                             max_frames=self.video.max_frames, seed=self.cfg.run.seed, limit=limit)
        flat = [e for group in examples for e in group][:limit]
        collate = self._collate()
        return [collate(flat[i : i + batch_size]) for i in range(0, len(flat), batch_size)]

    def loss(self, model, batch: VideoBatch, device) -> torch.Tensor:
        if not self.opts.caption_contrastive:
            return super().loss(model, batch, device)
        media = batch.media_inputs(device)
        context = model.encode_videos(media["videos"], media["video_aspect_ratios"], media["frame_mask"])
        labels = batch.labels.to(device)
        loss = labelled_loss_sum(model, batch.tokens.to(device), labels, video_context=context)
        contrastive = self.caption_contrastive(model, context, batch.captions, device)
        # The engine divides the step's summed loss by its labelled-token count; weight the term per token.
        return loss + self.opts.caption_contrastive * contrastive * (labels != IGNORE).sum()

    def caption_contrastive(self, model: MultimodalModel, context, captions: list[list[int]], device) -> torch.Tensor:
        """The contrastive term over the clips of the batch that have a caption (0 with fewer than two)."""
        rows = [i for i, c in enumerate(captions) if c]
        if len(rows) < 2:
            return context.tokens.sum() * 0.0
        tokens = torch.full((len(rows), max(len(captions[i]) for i in rows)), self.tokenizer.pad_id, dtype=torch.long)
        real = torch.zeros(tokens.shape, dtype=torch.bool)
        for j, i in enumerate(rows):
            tokens[j, : len(captions[i])] = torch.tensor(captions[i])
            real[j, : len(captions[i])] = True
        real = real.to(device)
        with torch.no_grad():  # the LM's table is the fixed text side
            text = (model.embed(tokens.to(device)) * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        groups = context.group_mask[rows][..., None, None].to(context.tokens.dtype)  # [n, videos, groups, 1, 1]
        video = (context.tokens[rows] * groups).sum((1, 2, 3)) / (groups.sum((1, 2, 3)) * context.tokens.shape[3])
        same = torch.tensor([[captions[i] == captions[j] for j in rows] for i in rows], device=device)
        return caption_contrastive_loss(video, text, same, self.opts.contrastive_temperature)

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        return answer_accuracy(model, batches, device, autocast, prefix="val_video", choices=ANSWERS)

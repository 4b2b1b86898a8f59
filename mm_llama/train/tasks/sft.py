"""Supervised fine-tuning (SPEC §3.3): cross-entropy on what the assistant says, dialogs packed apart.

Dialogs are packed whole into rows with document ids, so a dialog never attends to another and its
positions start at 0; the loss covers assistant content and its terminator, never prompts or headers.

Image SFT (SPEC §4.2): with a `model.vision` section the model is the composed image–text model and
each dialog keeps its images; a text token sees the images of its own dialog only (those whose
`<|image|>` precedes it, as in `MultimodalModel`), never a neighbour's in the packed row. The paper
trains the vision encoder and adapter with the LM frozen (the stage's `train.trainable`) and swaps in
the instruct LM (`train.options.lm_from`). `train.options.rankings: true` reads preference rankings as
dialogs: the prompt and its best response.

Video SFT on dialogs: with a `model.video` section as well, a dialog's `<|video|>` sees its own clip only
(`own_videos_mask`), the image rule applied to the aggregated frames. Speech SFT: with a `model.speech`
section the model is `SpeechLM`; a user's audio is `<|speech_start|> <|speech|>×L <|speech_end|>` in the
dialog's tokens and the adapter's L frames replace the placeholders (`adapters.speech.splice_speech`, as in
the speech adapter stage and `infer/speech.py`). Each clip sits inside its dialog's tokens, so the document
mask already keeps it from the neighbours.
"""
from __future__ import annotations

import torch
from pydantic import Field

from adapters.cross_attention import vision_mask
from adapters.video import video_mask

from ...config import ConfigError
from ...data.dialog import IGNORE, SFTBatch, SFTLoader, sft_heldout
from ..losses import labelled_loss_sum
from .base import register
from .post_base import PostOptions, PostTask, lm_blocks, lm_from_state

__all__ = ["SFT", "lm_from_state", "own_images_mask", "own_videos_mask", "video_groups"]


class SFTOptions(PostOptions):
    rankings: bool = Field(False, description="the sources hold preference rankings: train on prompt + best response")
    lm_from: str | None = Field(None, description="image, video or speech SFT: the LM (instruct model) whose "
                                "weights replace the composed model's LM")


def own_images_mask(batch: SFTBatch, image_id: int, max_tiles: int) -> torch.Tensor:
    """bool `[batch, seq, n_images, max_tiles]`: the tiles each position sees, limited to its own dialog's images."""
    seen = vision_mask(batch.tokens, image_id, batch.aspect_ratios, max_tiles)
    same = batch.doc_ids[:, :, None] == batch.image_docs[:, None, :]
    return seen & same[..., None]


def video_groups(batch: SFTBatch, frames_per_group: int) -> torch.Tensor:
    """bool `[batch, n_videos, groups]`: the aggregated frames that hold a real frame (`TemporalAggregator`'s
    group mask, read from the batch so that the mask is known before the forward pass)."""
    real = batch.frame_mask & (batch.video_aspect_ratios.prod(-1) > 0)  # [batch, n_videos, frames]
    return real.view(*real.shape[:2], -1, frames_per_group).any(-1)


def own_videos_mask(batch: SFTBatch, video_id: int, frames_per_group: int) -> torch.Tensor:
    """bool `[batch, seq, n_videos, groups]`: the aggregated frames each position sees (`adapters.video.video_mask`),
    limited to its own dialog's videos."""
    seen = video_mask(batch.tokens, video_id, video_groups(batch, frames_per_group))
    same = batch.doc_ids[:, :, None] == batch.video_docs[:, None, :]
    return seen & same[..., None]


@register("sft")
class SFT(PostTask):
    option_schema = SFTOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        if self.opts.lm_from is not None and cfg.model.vision is None and cfg.model.speech is None:
            raise ConfigError(f"stage '{cfg.name}': train.options.lm_from is for image, video or speech SFT (a model "
                              "with a vision: or speech: section)")

    def build_model(self):
        model = self.model_from_state(self.start_state())
        if self.opts.lm_from is not None:
            from ...post.average import read_model

            state, config = read_model(self.opts.lm_from)
            if config.lm != self.cfg.model.lm:
                raise ConfigError(f"train.options.lm_from {self.opts.lm_from}: its LM differs from model.lm")
            model.lm.load_state_dict(state, strict=not config.lm.tie_embeddings)
        return model

    def blocks(self, model):
        return lm_blocks(model)

    def _media(self) -> dict:
        return {"decode_media": self.media_parts(), "max_tiles": self.max_tiles, "rankings": self.opts.rankings,
                "frames_per_group": self.frames_per_group}

    def loader(self, seq_len, batch_size, rank, world_size):
        return SFTLoader(self.cfg.data, self.cfg.run.seed, rank, world_size, chat=self.chat, seq_len=seq_len,
                         batch_size=batch_size, **self._media())

    def count(self, batch) -> int:
        return int((batch.labels != IGNORE).sum())

    def media_inputs(self, model, batch: SFTBatch, device) -> dict:
        """The model's keyword arguments for the batch's media, each dialog limited to its own."""
        media = {}
        if batch.images is not None:
            mask = own_images_mask(batch, self.tokenizer.image_id, self.max_tiles)
            media = {"images": batch.images.to(device), "aspect_ratios": batch.aspect_ratios.to(device),
                     "vision_mask": mask.to(device)}
        if batch.videos is not None:
            mask = own_videos_mask(batch, self.tokenizer.video_id, self.frames_per_group)
            media |= {"videos": batch.videos.to(device), "video_aspect_ratios": batch.video_aspect_ratios.to(device),
                      "frame_mask": batch.frame_mask.to(device), "video_mask": mask.to(device)}
        if batch.speech_feats is not None:
            media |= {"speech_feats": batch.speech_feats.to(device), "speech_lengths": batch.speech_lengths.to(device)}
        return media

    def loss(self, model, batch: SFTBatch, device) -> torch.Tensor:
        media = self.media_inputs(model, batch, device)
        return labelled_loss_sum(model, batch.tokens.to(device), batch.labels.to(device),
                                 doc_ids=batch.doc_ids.to(device), **media)

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        return sft_heldout(self.cfg.data, self.chat, seq_len, batch_size, self.cfg.train.eval_batches, **self._media())

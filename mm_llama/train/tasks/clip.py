"""Image encoder pre-training (SPEC §4.1): CLIP's contrastive objective on image–text pairs.

The image tower is the stage's own `VisionEncoder` (`model.vision.encoder`), so its weights load
unchanged into the vision adapter stage (`vision_lm`'s `encoder_from`); only its projection, here
into the joint embedding space, is replaced there by one into the LM's width. An image's embedding
is the class token of its real tiles, averaged. The text tower, tokenizer and loss are open_clip's:
`TextTransformer`, the CLIP BPE `SimpleTokenizer` (shipped in the wheel, offline) and `ClipLoss`.

The loss of a micro-batch uses only its own negatives, so gradient accumulation is not one large
contrastive batch (unlike the other objectives); raise `train.micro_batch` rather than `grad_accum`.
Evaluation: zero-shot retrieval top-1 over the held-out pairs, image→text and text→image. A retrieved
caption counts as right when its text equals the query's own (demo captions repeat); the chance
level is the expected accuracy of a uniformly random pick under the same rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from encoders.vision.args import VisionEncoderArgs
from encoders.vision.encoder import VisionEncoder

from ...checkpoint.native import MODEL_SAFETENSORS, read_safetensors
from ...config import ConfigError
from ...data import check_sources
from ...data.image_text import ImageLoader, Tiled, collate_images, heldout_examples, sample_caption, sample_metadata
from ...data.text_stream import SkipSample
from ..checkpointing import load_weights
from .base import Task, register
from .vision_lm import model_folder

CLIP_VOCAB = 49408  # open_clip's SimpleTokenizer


class ClipOptions(BaseModel):
    """`train.options` of the `clip` objective: the text tower and joint space (the image tower is `model.vision`)."""

    model_config = ConfigDict(extra="forbid")

    embed_dim: int = Field(64, gt=0, description="joint image-text embedding width")
    text_width: int = Field(64, gt=0)
    text_layers: int = Field(2, gt=0)
    text_heads: int = Field(4, gt=0)
    context_length: int = Field(32, gt=1, description="caption tokens (CLIP BPE), truncated beyond")
    init_temperature: float = Field(0.07, gt=0, description="initial softmax temperature (CLIP's 0.07)")
    max_tiles: int = Field(1, gt=0, description="tiles per image (the paper's CLIP sees one 224-px tile); "
                                                 "the encoder keeps model.vision.encoder.max_num_tiles slots")


class ClipModel(nn.Module):
    """`vision`: the image encoder; `text`: open_clip's text tower; `logit_scale`: log of 1/temperature."""

    def __init__(self, encoder: VisionEncoderArgs, opts: ClipOptions):
        super().__init__()
        if opts.text_width % opts.text_heads:
            raise ConfigError(f"train.options.text_heads ({opts.text_heads}) must divide text_width ({opts.text_width})")
        self.vision = VisionEncoder(encoder, out_dim=opts.embed_dim)
        self.text = TextTransformer(context_length=opts.context_length, vocab_size=CLIP_VOCAB, width=opts.text_width,
                                    heads=opts.text_heads, layers=opts.text_layers, output_dim=opts.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / opts.init_temperature)))

    def encode_image(self, images: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
        """images `[batch, 1, max_tiles, 3, S, S]`, aspect ratios `[batch, 1, 2]` → unit vectors `[batch, embed]`."""
        cls = self.vision(images, aspect_ratios)[:, 0, :, 0]  # [batch, max_tiles, embed]
        n_tiles = (aspect_ratios[:, 0, 0] * aspect_ratios[:, 0, 1]).clamp(min=1)
        real = (torch.arange(cls.shape[1], device=cls.device)[None] < n_tiles[:, None]).to(cls.dtype)
        pooled = (cls * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        return F.normalize(pooled, dim=-1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """CLIP BPE ids `[batch, context]` → unit vectors `[batch, embed]`."""
        return F.normalize(self.text(text), dim=-1)

    def forward(self, images, aspect_ratios, text) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, exp(logit_scale)): what `open_clip.loss.ClipLoss` takes."""
        return self.encode_image(images, aspect_ratios), self.encode_text(text), self.logit_scale.exp()


@dataclass
class ClipExample:
    image: Tiled
    caption: str
    text: torch.Tensor  # [context] CLIP BPE ids


@dataclass
class ClipBatch:
    """images `[batch, 1, max_tiles, 3, S, S]`, aspect_ratios `[batch, 1, 2]`, text `[batch, context]`."""

    images: torch.Tensor
    aspect_ratios: torch.Tensor
    text: torch.Tensor
    captions: list[str]


class CaptionExamples:
    """A shard sample → `ClipExample` (its caption tokenized); runs in the loader's workers."""

    def __init__(self, context_length: int):
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    def __call__(self, sample: dict, image: Tiled, seed: int) -> ClipExample:
        text = sample_caption(sample, sample_metadata(sample))
        if text is None:
            raise SkipSample("no caption (txt member or json caption)")
        return ClipExample(image, text, self.tokenizer([text])[0])


class CollateClip:
    def __init__(self, max_tiles: int):
        self.max_tiles = max_tiles

    def __call__(self, examples: list[ClipExample]) -> ClipBatch:
        images, ratios = collate_images([e.image for e in examples], self.max_tiles)
        return ClipBatch(images, ratios, torch.stack([e.text for e in examples]), [e.caption for e in examples])


def retrieval_top1(image_f: torch.Tensor, text_f: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Zero-shot retrieval over N pairs (features `[N, embed]`, unit length): top-1 image→text, text→image, chance.

    A pick is right when its caption's text equals the query's caption.
    """
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions])
    sim = image_f.float() @ text_f.float().T
    same = label[:, None] == label[None, :]
    return {"val_retrieval_i2t": float(same[torch.arange(len(captions)), sim.argmax(1)].float().mean()),
            "val_retrieval_t2i": float(same[sim.argmax(0), torch.arange(len(captions))].float().mean()),
            "val_retrieval_chance": float(same.float().mean())}


@register("clip")
class Clip(Task):
    """Contrastive pre-training of the image encoder (ViT, tile embeddings, global layers) with a text tower."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.opts = self.options(ClipOptions)
        if cfg.model.vision is None:
            raise ConfigError(f"stage '{cfg.name}': the clip objective needs a model with a vision: section")
        self.encoder = cfg.model.vision.encoder
        if self.opts.max_tiles > self.encoder.max_num_tiles:
            raise ConfigError(f"train.options.max_tiles ({self.opts.max_tiles}) exceeds model.vision.encoder."
                              f"max_num_tiles ({self.encoder.max_num_tiles})")

    def check(self) -> None:
        check_sources(self.cfg.data)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.run.seed)
        model = ClipModel(self.encoder, self.opts)
        if self.cfg.init.from_ is not None:  # continue from an earlier CLIP model
            folder = model_folder(self.cfg.init.from_)
            load_weights(model, read_safetensors(folder / MODEL_SAFETENSORS), str(folder / MODEL_SAFETENSORS))
        return model

    def _examples(self):
        return CaptionExamples(self.opts.context_length), CollateClip(self.encoder.max_num_tiles)

    def loader(self, seq_len, batch_size, rank, world_size):
        """`seq_len` is unused: captions have `train.options.context_length` tokens."""
        make, collate = self._examples()
        return ImageLoader(self.cfg.data, make, collate, batch_size=batch_size, seed=self.cfg.run.seed,
                           tile_size=self.encoder.tile_size, max_tiles=self.opts.max_tiles,
                           rank=rank, world_size=world_size)

    def count(self, batch: ClipBatch) -> int:
        return batch.text.shape[0]

    def loss(self, model, batch: ClipBatch, device) -> torch.Tensor:
        img, txt, scale = model(batch.images.to(device), batch.aspect_ratios.to(device), batch.text.to(device))
        return ClipLoss()(img, txt, scale) * batch.text.shape[0]  # ClipLoss averages over the pairs

    def batch_tokens(self, batch: ClipBatch) -> int:
        return batch.text.shape[0]

    def heldout(self, seq_len, batch_size) -> list:
        if not self.cfg.data.heldout or not self.cfg.train.eval_batches:
            return []
        make, collate = self._examples()
        examples, _ = heldout_examples(self.cfg.data, make, tile_size=self.encoder.tile_size,
                                       max_tiles=self.opts.max_tiles, seed=self.cfg.run.seed,
                                       limit=batch_size * self.cfg.train.eval_batches)
        return [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]

    def evaluate(self, model, batches, device, autocast) -> dict[str, float]:
        """`val_loss` (contrastive loss per pair, within each batch) and retrieval top-1 over all held-out pairs."""
        was_training = model.training
        model.eval()
        image_f, text_f, captions, total = [], [], [], 0.0
        with torch.no_grad():
            for b in batches:
                with autocast():
                    img, txt, scale = model(b.images.to(device), b.aspect_ratios.to(device), b.text.to(device))
                    total += float(ClipLoss()(img, txt, scale)) * len(b.captions)
                image_f.append(img.cpu())
                text_f.append(txt.cpu())
                captions += b.captions
        model.train(was_training)
        if not captions:
            return {}
        return {"val_loss": total / len(captions), **retrieval_top1(torch.cat(image_f), torch.cat(text_f), captions)}

"""The composed image–text model (SPEC §4.3): a Llama 3 LM, the image encoder, gated cross-attention.

The model *holds* its parts and never renames or changes the LM's parameters: `lm` is a plain
`Transformer` (Meta's keys), `vision` the `VisionEncoder`, `cross_attention["i"]` the block that runs
before LM layer i. `<|image|>` is embedded from row 0 of the separate table `image_embedding`
(torchtune's FusionEmbedding idea), initialised from the LM's own row for that token, so that a fresh
model (all gates at zero) gives exactly the text LM's logits.

With a `video` config the model also holds `video_aggregator` (the perceiver resampler of
`adapters.video`) and `video_cross_attention["i"]`, gated blocks like the image ones that run before LM
layer i and before that layer's image block. Frames go through the same `vision` encoder. `<|video|>`
keeps the LM's own (frozen) embedding row: the paper's video stage trains only the aggregator and the
video cross-attention. With the video gates at zero the model equals the image model exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters.cross_attention import CrossAttentionBlock, cross_attention_bias, vision_mask
from adapters.video import TemporalAggregator, frame_token_mask, video_mask
from encoders.vision.encoder import VisionEncoder

from ..config.video import VideoConfig
from ..config.vision import VisionConfig
from .args import LlamaArgs
from .kv_cache import KVCache
from .llama import Transformer


@dataclass
class ImageContext:
    """What the text side needs from a batch of images, computed once per request.

    tokens `[batch, n_images, max_tiles, tokens_per_tile, dim]`; kv: per cross-attention block, K and V
    `[batch, kv_heads, n_images·max_tiles·tokens_per_tile, head_dim]`; aspect_ratios `[batch, n_images, 2]`.
    """

    tokens: torch.Tensor
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    aspect_ratios: torch.Tensor


@dataclass
class VideoContext:
    """What the text side needs from a batch of videos, computed once per request.

    tokens `[batch, n_videos, groups, n_latents, dim]` (aggregated frames); kv: per video cross-attention
    block, K and V `[batch, kv_heads, n_videos·groups·n_latents, head_dim]`; group_mask bool
    `[batch, n_videos, groups]` (the aggregated frame holds at least one real frame).
    """

    tokens: torch.Tensor
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    group_mask: torch.Tensor


class MultimodalModel(nn.Module):
    """`model(tokens, images=..., aspect_ratios=...)` → logits `[batch, seq, vocab]`."""

    def __init__(self, lm: Transformer | LlamaArgs, vision: VisionConfig, video: VideoConfig | None = None):
        super().__init__()
        self.lm = lm if isinstance(lm, Transformer) else Transformer(lm)
        args = self.lm.args
        self.config = vision
        self.image_token_id = vision.image_token_for(args.vocab_size)
        self.vision = VisionEncoder(vision.encoder, out_dim=args.dim)
        self.cross_attention = nn.ModuleDict(
            {str(i): CrossAttentionBlock(args, vision.mask_attention_rows) for i in vision.layers_for(args.n_layers)}
        )
        self.image_embedding = nn.Embedding(vision.extra_token_rows, args.dim)
        with torch.no_grad():
            self.image_embedding.weight[0].copy_(self.lm.tok_embeddings.weight[self.image_token_id])
        self.video_config = video
        if video is not None:
            self.video_token_id = video.video_token_for(args.vocab_size)
            self.video_aggregator = TemporalAggregator(
                args.dim, frames_per_group=video.frames_per_group, max_frames=video.max_frames,
                n_latents=video.n_latents, layers=video.aggregator_layers,
                heads=video.aggregator_heads or args.n_heads, ffn_mult=video.aggregator_ffn_mult,
                media_tokens=vision.encoder.max_num_tiles * vision.encoder.tokens_per_tile)
            layers = video.layers_for(sorted(map(int, self.cross_attention)), args.n_layers)
            self.video_cross_attention = nn.ModuleDict(
                {str(i): CrossAttentionBlock(args, vision.mask_attention_rows) for i in layers})

    @property
    def args(self) -> LlamaArgs:
        return self.lm.args

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens `[batch, seq]` → `[batch, seq, dim]`; `<|image|>` from `image_embedding`, the rest from the LM."""
        h = self.lm.tok_embeddings(tokens)
        is_image = (tokens == self.image_token_id)[..., None]
        return torch.where(is_image, self.image_embedding.weight[0].to(h.dtype), h)

    def encode_images(self, images: torch.Tensor, aspect_ratios: torch.Tensor) -> ImageContext:
        """images `[batch, n_images, max_tiles, 3, tile, tile]`, aspect_ratios `[batch, n_images, 2]`."""
        tokens = self.vision(images, aspect_ratios)
        flat = tokens.flatten(1, 3)
        kv = {i: block.kv(flat) for i, block in self.cross_attention.items()}
        return ImageContext(tokens, kv, aspect_ratios)

    def encode_videos(self, videos: torch.Tensor, aspect_ratios: torch.Tensor, frame_mask: torch.Tensor) -> VideoContext:
        """videos `[batch, n_videos, frames, max_tiles, 3, tile, tile]`, aspect_ratios `[batch, n_videos, frames, 2]`
        (per frame), frame_mask bool `[batch, n_videos, frames]` (False: padding) → `VideoContext`.

        `frames` is padded to a multiple of `frames_per_group` (`mm_llama.data.video.collate_videos` does this).
        """
        if self.video_config is None:
            raise ValueError("this model has no video adapter (model config without a video: section)")
        b, v, f = videos.shape[:3]
        if aspect_ratios.shape != (b, v, f, 2) or frame_mask.shape != (b, v, f):
            raise ValueError(f"videos {list(videos.shape)} need aspect_ratios [{b}, {v}, {f}, 2] and frame_mask "
                             f"[{b}, {v}, {f}], got {list(aspect_ratios.shape)} and {list(frame_mask.shape)}")
        ratios = aspect_ratios * frame_mask[..., None]  # a padding frame is an empty image slot
        tokens = self.vision(videos.flatten(1, 2), ratios.flatten(1, 2))  # [b, v·f, tiles, tokens_per_tile, dim]
        tiles, per_tile = tokens.shape[2:4]
        keep = frame_token_mask(ratios, frame_mask, tiles, per_tile)
        aggregated, groups = self.video_aggregator(tokens.reshape(b * v, f, tiles * per_tile, -1),
                                                   keep.reshape(b * v, f, -1))
        aggregated = aggregated.view(b, v, *aggregated.shape[1:])
        flat = aggregated.flatten(1, 3)
        kv = {i: block.kv(flat) for i, block in self.video_cross_attention.items()}
        return VideoContext(aggregated, kv, groups.view(b, v, -1))

    def video_mask(self, tokens: torch.Tensor, group_mask: torch.Tensor) -> torch.Tensor:
        """bool `[batch, seq, n_videos, groups]` for a whole sequence (see `adapters.video.video_mask`)."""
        return video_mask(tokens, self.video_token_id, group_mask)

    def vision_mask(self, tokens: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
        """bool `[batch, seq, n_images, max_tiles]` for a whole sequence (see `adapters.vision_mask`)."""
        return vision_mask(tokens, self.image_token_id, aspect_ratios, self.config.encoder.max_num_tiles)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        images: torch.Tensor | None = None,
        aspect_ratios: torch.Tensor | None = None,
        image_context: ImageContext | None = None,
        vision_mask: torch.Tensor | None = None,
        videos: torch.Tensor | None = None,
        video_aspect_ratios: torch.Tensor | None = None,
        frame_mask: torch.Tensor | None = None,
        video_context: VideoContext | None = None,
        video_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        start_pos: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens `[batch, seq]` → logits `[batch, seq, vocab]` (`[n, vocab]` where `logits_at` `[batch, seq]`,
        bool, selects `n` positions).

        Pass `images` + `aspect_ratios`, or an `image_context` from `encode_images` (reused across decode
        steps). `vision_mask` `[batch, seq, n_images, max_tiles]` defaults to the one `tokens` implies,
        which is right only when `tokens` is the whole sequence; during cached decoding pass the slice of
        the full sequence's mask. Without images every cross-attention block is skipped.

        Videos likewise: `videos` + `video_aspect_ratios` + `frame_mask` (see `encode_videos`), or a
        `video_context`; `video_mask` `[batch, seq, n_videos, groups]` defaults to the one `tokens` implies.
        """
        if images is not None:
            if aspect_ratios is None:
                raise ValueError("images need aspect_ratios [batch, n_images, 2] (rows, cols)")
            if image_context is not None:
                raise ValueError("pass either images or image_context, not both")
            image_context = self.encode_images(images, aspect_ratios)
        h = self.embed(tokens)
        (cos, sin), mask = self.lm.prepare(tokens, doc_ids, positions, start_pos)
        if image_context is None:
            if vision_mask is not None or (start_pos == 0 and (tokens == self.image_token_id).any()):
                raise ValueError("tokens contain <|image|> (or a vision_mask was given) but no images were passed")
            bias = rows = None
        else:
            if vision_mask is None:
                vision_mask = self.vision_mask(tokens, image_context.aspect_ratios)
            expected = (*tokens.shape, *image_context.tokens.shape[1:3])
            if tuple(vision_mask.shape) != expected:
                raise ValueError(f"vision_mask must be {list(expected)}, got {list(vision_mask.shape)}")
            bias, rows = cross_attention_bias(vision_mask, image_context.tokens.shape[3], h.dtype)
        video_bias = video_rows = None
        if videos is not None:
            if video_aspect_ratios is None or frame_mask is None:
                raise ValueError("videos need video_aspect_ratios [batch, n_videos, frames, 2] and frame_mask")
            if video_context is not None:
                raise ValueError("pass either videos or video_context, not both")
            video_context = self.encode_videos(videos, video_aspect_ratios, frame_mask)
        if video_context is None:
            has_video_token = self.video_config is not None and (tokens == self.video_token_id).any()
            if video_mask is not None or (start_pos == 0 and has_video_token):
                raise ValueError("tokens contain <|video|> (or a video_mask was given) but no videos were passed")
        else:
            if video_mask is None:
                video_mask = self.video_mask(tokens, video_context.group_mask)
            expected = (*tokens.shape, *video_context.tokens.shape[1:3])
            if tuple(video_mask.shape) != expected:
                raise ValueError(f"video_mask must be {list(expected)}, got {list(video_mask.shape)}")
            video_bias, video_rows = cross_attention_bias(video_mask, video_context.tokens.shape[3], h.dtype)
        for i, layer in enumerate(self.lm.layers):
            if video_context is not None and str(i) in self.video_cross_attention:
                h = self.video_cross_attention[str(i)](h, video_context.kv[str(i)], video_bias, video_rows)
            block = self.cross_attention[str(i)] if str(i) in self.cross_attention else None
            if block is not None and image_context is not None:
                h = block(h, image_context.kv[str(i)], bias, rows)
            h = layer(h, cos, sin, mask, caches[i] if caches is not None else None, start_pos)
        return self.lm.logits(self.lm.norm(h), logits_at)

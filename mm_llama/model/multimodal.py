"""The composed image–text model (SPEC §4.3): a Llama 3 LM, the image encoder, gated cross-attention.

The model *holds* its parts and never renames or changes the LM's parameters: `lm` is a plain
`Transformer` (Meta's keys), `vision` the `VisionEncoder`, `cross_attention["i"]` the block that runs
before LM layer i. `<|image|>` is embedded from row 0 of the separate table `image_embedding`
(torchtune's FusionEmbedding idea), initialised from the LM's own row for that token, so that a fresh
model (all gates at zero) gives exactly the text LM's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adapters.cross_attention import CrossAttentionBlock, cross_attention_bias, vision_mask
from encoders.vision.encoder import VisionEncoder

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


class MultimodalModel(nn.Module):
    """`model(tokens, images=..., aspect_ratios=...)` → logits `[batch, seq, vocab]`."""

    def __init__(self, lm: Transformer | LlamaArgs, vision: VisionConfig):
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
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """tokens `[batch, seq]` → logits `[batch, seq, vocab]`.

        Pass `images` + `aspect_ratios`, or an `image_context` from `encode_images` (reused across decode
        steps). `vision_mask` `[batch, seq, n_images, max_tiles]` defaults to the one `tokens` implies,
        which is right only when `tokens` is the whole sequence; during cached decoding pass the slice of
        the full sequence's mask. Without images every cross-attention block is skipped.
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
        for i, layer in enumerate(self.lm.layers):
            block = self.cross_attention[str(i)] if str(i) in self.cross_attention else None
            if block is not None and image_context is not None:
                h = block(h, image_context.kv[str(i)], bias, rows)
            h = layer(h, cos, sin, mask, caches[i] if caches is not None else None, start_pos)
        return self.lm.output(self.lm.norm(h)).float()

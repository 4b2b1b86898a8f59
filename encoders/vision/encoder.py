"""The Llama 3.2-Vision image encoder on an open_clip ViT (SPEC §4.1, §4.3).

Per image: patchify every tile → + gated pre-tile embedding → + class token → + positional
embedding, blended between the ViT's own (local) map and a per-grid (global) map by one tanh gate →
`ln_pre` → pad each tile to a multiple of 8 tokens → one sequence over all tiles of the image through
the ViT blocks, tapping `intermediate_layers` → `ln_post` → + gated post-tile embedding → the gated
global layers → [final, taps...] concatenated (7,680 wide for ViT-H) → linear projection to the LM width.

The tile embeddings are tables indexed by the tile grid (one row per supported (rows, cols), row 0
for an empty image slot), the layout `transformers` stores; Meta's per-(row, col) tables map into it.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import CustomResidualAttentionBlock, VisionTransformer
from torch import nn

from .args import VisionEncoderArgs
from .transform import supported_aspect_ratios


class GatedBlock(nn.Module):
    """An open_clip residual block whose two branches are scaled by tanh gates that start at zero."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, attention_bias: bool):
        super().__init__()
        self.block = CustomResidualAttentionBlock(width, heads, mlp_ratio)
        if not attention_bias:
            _drop_attention_bias(self.block)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x `[batch, seq, width]` → same shape."""
        b = self.block
        x = x + self.gate_attn.tanh() * b.attn(b.ln_1(x), attn_mask=mask)
        return x + self.gate_ffn.tanh() * b.mlp(b.ln_2(x))


def _drop_attention_bias(block: CustomResidualAttentionBlock) -> None:
    # open_clip's blocks always build q/k/v/o biases; Llama 3.2's ViT has none, so remove them.
    block.attn.in_proj_bias = None
    block.attn.out_proj.bias = None


def read_open_clip_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The `visual` tower's tensors from a local open_clip checkpoint (full CLIP, tower only, or a training
    checkpoint with `state_dict` and DDP `module.` prefixes); `.safetensors` or a PyTorch file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such open_clip checkpoint file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


class VisionEncoder(nn.Module):
    """images `[batch, n_images, max_tiles, 3, tile, tile]`, aspect ratios `[batch, n_images, 2]` (rows, cols;
    (0, 0) marks an empty slot) → vision tokens `[batch, n_images, max_tiles, tokens_per_tile, out_dim]`."""

    def __init__(self, args: VisionEncoderArgs, out_dim: int):
        super().__init__()
        self.args = args
        w, t, n = args.width, args.max_num_tiles, args.tokens_per_tile
        self.vit = VisionTransformer(image_size=args.tile_size, patch_size=args.patch_size, width=w,
                                     layers=args.layers, heads=args.heads, mlp_ratio=args.mlp_ratio,
                                     output_dim=w, block_type="custom")
        if not args.attention_bias:
            for block in self.vit.transformer.resblocks:
                _drop_attention_bias(block)
        if args.checkpoint is not None:
            self._load_backbone(args.checkpoint)
        # The contrastive head is not used; open_clip's own pruning call removes it.
        self.vit.prune_intermediate_layers(indices=1, prune_norm=False, prune_head=True)

        scale = w**-0.5
        rows = len(supported_aspect_ratios(t)) + 1
        self.pre_tile_embedding = nn.Parameter(scale * torch.randn(rows, t, w))
        self.pre_tile_gate = nn.Parameter(torch.zeros(1))
        self.tile_position_embedding = nn.Parameter(scale * torch.randn(rows, t, n, w))
        self.position_gate = nn.Parameter(torch.zeros(1))
        self.post_tile_embedding = nn.Parameter(scale * torch.randn(rows, t, w))
        self.post_tile_gate = nn.Parameter(torch.zeros(1))
        self.global_layers = nn.ModuleList(GatedBlock(w, args.heads, args.mlp_ratio, args.attention_bias)
                                           for _ in range(args.n_global_layers))
        self.projection = nn.Linear(args.output_dim, out_dim, bias=True)

    def _load_backbone(self, path: str) -> None:
        state = read_open_clip_checkpoint(path)
        state.pop("proj", None)  # the contrastive head, pruned below
        expected = {k: v for k, v in self.vit.state_dict().items() if k != "proj"}
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(f"{path}: does not fit vision encoder (missing {sorted(missing)[:5]}, unexpected "
                             f"{sorted(unexpected)[:5]}); check width/layers/attention_bias")
        wrong = [k for k in expected if state[k].shape != expected[k].shape]
        if wrong:
            k = wrong[0]
            raise ValueError(f"{path}: '{k}' has shape {list(state[k].shape)}, the config needs "
                             f"{list(expected[k].shape)} (tile_size/patch_size/width must match the checkpoint)")
        self.vit.load_state_dict(state, strict=False)

    def grid_index(self, aspect_ratios: torch.Tensor) -> torch.Tensor:
        """(rows, cols) `[..., 2]` → row of the tile tables `[...]` (0 for an empty slot)."""
        t = self.args.max_num_tiles
        if aspect_ratios.shape[-1] != 2 or aspect_ratios.min() < 0 or aspect_ratios.max() > t:
            raise ValueError(f"aspect ratios must be (rows, cols) pairs in [0, {t}], got {aspect_ratios.tolist()}")
        table = torch.full((t + 1, t + 1), -1, dtype=torch.long, device=aspect_ratios.device)
        table[0, 0] = 0
        for k, (r, c) in enumerate(supported_aspect_ratios(t), start=1):
            table[r, c] = k
        ids = table[aspect_ratios[..., 0], aspect_ratios[..., 1]]
        if (ids < 0).any():
            bad = aspect_ratios[ids < 0][0].tolist()
            raise ValueError(f"tile grid {bad} is not among {list(supported_aspect_ratios(t))}")
        return ids

    def attention_mask(self, aspect_ratios: torch.Tensor, padded: int) -> torch.Tensor:
        """Additive mask `[images, 1, tiles·padded, tiles·padded]` that blocks pad→pad pairs only.

        Pad = the alignment tokens of every tile and all tokens of unused tiles. Real tokens may still
        attend to pads, exactly as Meta's `build_encoder_attention_mask` (and `transformers`) do.
        """
        t, n = self.args.max_num_tiles, self.args.tokens_per_tile
        # An empty slot is encoded like a one-tile black image, as Meta and transformers do.
        n_tiles = (aspect_ratios[:, 0] * aspect_ratios[:, 1]).clamp(min=1)
        tile = torch.arange(t, device=aspect_ratios.device)
        token = torch.arange(padded, device=aspect_ratios.device)
        real = (tile[None, :, None] < n_tiles[:, None, None]) & (token[None, None, :] < n)
        pad = (~real).flatten(1)
        mask = torch.zeros(pad.shape + pad.shape[-1:], dtype=torch.float32, device=pad.device)
        mask.masked_fill_(pad[:, :, None] & pad[:, None, :], torch.finfo(torch.float32).min)
        return mask[:, None]

    def forward(self, images: torch.Tensor, aspect_ratios: torch.Tensor) -> torch.Tensor:
        a, vit = self.args, self.vit
        if images.ndim != 6 or images.shape[2] != a.max_num_tiles or images.shape[-1] != a.tile_size:
            raise ValueError(f"images must be [batch, n_images, {a.max_num_tiles}, 3, {a.tile_size}, {a.tile_size}], "
                             f"got {list(images.shape)}")
        b, m = images.shape[:2]
        if aspect_ratios.shape != (b, m, 2):
            raise ValueError(f"aspect_ratios must be [{b}, {m}, 2], got {list(aspect_ratios.shape)}")
        ratios = aspect_ratios.reshape(b * m, 2)
        ids = self.grid_index(ratios)
        t, n, w = a.max_num_tiles, a.tokens_per_tile, a.width

        x = vit.conv1(images.reshape(b * m * t, 3, a.tile_size, a.tile_size).to(vit.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(b * m, t, n - 1, w)
        x = x + self.pre_tile_gate.tanh() * self.pre_tile_embedding[ids][:, :, None]
        x = torch.cat([vit.class_embedding.to(x.dtype).expand(b * m, t, 1, w), x], dim=2)
        g = self.position_gate.tanh()
        x = x + (1 - g) * vit.positional_embedding + g * self.tile_position_embedding[ids]
        x = vit.ln_pre(x)

        pad = (-n) % 8
        x = F.pad(x, (0, 0, 0, pad)).reshape(b * m, t * (n + pad), w)
        mask = self.attention_mask(ratios, n + pad).to(x.dtype)
        taps = []
        for i, block in enumerate(vit.transformer.resblocks):
            if i in a.intermediate_layers:
                taps.append(x)
            x = block(x, attn_mask=mask)
        if a.layers in a.intermediate_layers:
            taps.append(x)

        x = vit.ln_post(x).view(b * m, t, n + pad, w)
        x = x + self.post_tile_gate.tanh() * self.post_tile_embedding[ids][:, :, None]
        x = x.view(b * m, t * (n + pad), w)
        for layer in self.global_layers:
            x = layer(x, mask)
        # Taps are stacked on a last axis and flattened, so channel c of every tap sits together
        # (Meta's layout, which the projection weights of released checkpoints assume).
        x = torch.cat([x, torch.stack(taps, dim=-1).flatten(-2)], dim=-1) if taps else x
        return self.projection(x.view(b, m, t, n + pad, -1)[:, :, :, :n])

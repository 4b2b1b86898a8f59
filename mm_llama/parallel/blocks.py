"""The repeated blocks of the composed models, found by type: the units FSDP shards one by one.

The task files name no blocks for sharding; every model is a tree of the same few block types, so
they are discovered here: the LM's `TransformerBlock`s, the gated `CrossAttentionBlock`s (image and
video), the image encoder's open_clip residual blocks (ViT and CLIP text tower) and gated global
layers, the video aggregator's `PerceiverLayer`s and the Conformer's blocks. The outermost match
wins (a `GatedBlock` is one unit, not its inner open_clip block).
"""
from __future__ import annotations

from torch import nn


def block_types() -> tuple[type, ...]:
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    from adapters.cross_attention import CrossAttentionBlock
    from adapters.video import PerceiverLayer
    from encoders.speech.conformer import ConformerBlock
    from encoders.vision.encoder import GatedBlock

    from ..model.llama import TransformerBlock

    return (TransformerBlock, CrossAttentionBlock, GatedBlock, CustomResidualAttentionBlock, ResidualAttentionBlock,
            PerceiverLayer, ConformerBlock)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of `model` in module order, outermost matches only (the root itself never)."""
    kinds = block_types()
    units: list[nn.Module] = []
    inside: set[str] = set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, kinds):
            units.append(module)
            inside.add(name)
    return units

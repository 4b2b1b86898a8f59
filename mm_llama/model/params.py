"""Parameter counting on the meta device: no memory is allocated."""
from __future__ import annotations

import torch
from torch import nn

from ..config.model import ModelConfig
from .llama import Transformer


def build_meta(config: ModelConfig) -> nn.Module:
    """The model a config describes (the LM, or the composed multimodal model), without memory."""
    with torch.device("meta"):
        if config.vision is not None:
            from .multimodal import MultimodalModel

            return MultimodalModel(config.lm, config.vision, config.video)
        return Transformer(config.lm)


def component_table(model: nn.Module) -> list[tuple[str, int]]:
    """Rows (component, count) of a composed model: one per top-level child."""
    return [(name, count(child)) for name, child in model.named_children()]


def speech_components(config: ModelConfig) -> list[tuple[str, int]]:
    """Rows for the speech encoder and adapter (the BEST-RQ heads exist only during encoder pre-training)."""
    from adapters.speech import SpeechAdapter
    from encoders.speech.conformer import ConformerEncoder

    with torch.device("meta"):
        encoder = ConformerEncoder(config.speech.encoder)
        adapter = SpeechAdapter(config.speech.encoder.dim, config.speech.adapter, config.lm.dim)
    return [("speech_encoder", count(encoder)), ("speech_adapter", count(adapter))]


def count(module: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (a tied weight counts once)."""
    seen = {id(p): p for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())


def parameter_table(model: Transformer) -> list[tuple[str, int]]:
    """Rows (part, count) for the LM: embeddings, per-block attention/FFN/norms, final norm, output."""
    layer = model.layers[0]
    n = len(model.layers)
    rows = [
        ("tok_embeddings", model.tok_embeddings.weight.numel()),
        (f"layers x{n}: attention", n * count(layer.attention)),
        (f"layers x{n}: feed_forward", n * count(layer.feed_forward)),
        (f"layers x{n}: norms", n * (count(layer.attention_norm) + count(layer.ffn_norm))),
        ("norm", count(model.norm)),
        ("output" + (" (tied to tok_embeddings)" if model.args.tie_embeddings else ""),
         0 if model.args.tie_embeddings else model.output.weight.numel()),
    ]
    return rows

"""Hugging Face `Mllama` (Llama 3.2-Vision) folders and state dicts → our `MultimodalModel`.

`transformers` interleaves the cross-attention layers into one 40-layer stack (11B: at 3, 8, …, 38);
ours are separate blocks keyed by the self-attention layer they precede (3, 7, …, 31). Self-attention
layers go through the Llama key map and rotary permutation of `checkpoint.hf`; cross-attention has no
rotary embedding, so its q/k rows stay as they are. The 8 extra rows of `embed_tokens` (ids ≥ vocab,
`<|image|>` = the first) become `image_embedding`.

Two documented differences of `transformers` (checked on 5.24) from Meta's reference, which the
released weights were trained with; `semantics="transformers"` reproduces them for parity checks:
  * intermediate taps: `hidden_states[i]` there is the output of vision block i; Meta taps its input;
  * text rows that see no image yet: the row mask zeroes only the FFN branch there, not the attention.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch

from encoders.vision.args import VisionEncoderArgs
from encoders.vision.transform import supported_aspect_ratios

from ..config.vision import VisionConfig
from ..model.args import LlamaArgs
from ..model.multimodal import MultimodalModel
from .hf import CONFIG_JSON, args_from_hf_config, from_hf_state_dict, read_hf_weights
from .native import CheckpointError, build_model, check_state_dict

Semantics = Literal["meta", "transformers"]

# transformers' vision block key (after `layers.{i}.`) → open_clip's (after `resblocks.{i}.` / `block.`).
VISION_BLOCK_KEYS = {
    "self_attn.o_proj.weight": "attn.out_proj.weight",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
    "input_layernorm.weight": "ln_1.weight", "input_layernorm.bias": "ln_1.bias",
    "post_attention_layernorm.weight": "ln_2.weight", "post_attention_layernorm.bias": "ln_2.bias",
}
VISION_TOP_KEYS = {
    "class_embedding": "vit.class_embedding",
    "patch_embedding.weight": "vit.conv1.weight",
    "gated_positional_embedding.embedding": "vit.positional_embedding",
    "gated_positional_embedding.gate": "position_gate",
    "pre_tile_positional_embedding.gate": "pre_tile_gate",
    "post_tile_positional_embedding.gate": "post_tile_gate",
    "layernorm_pre.weight": "vit.ln_pre.weight", "layernorm_pre.bias": "vit.ln_pre.bias",
    "layernorm_post.weight": "vit.ln_post.weight", "layernorm_post.bias": "vit.ln_post.bias",
}
CROSS_KEYS = {
    "cross_attn.q_proj.weight": "attention.wq.weight", "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight", "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight", "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "cross_attn_attn_gate": "gate_attn", "cross_attn_mlp_gate": "gate_ffwd",
}
VISION_LAYER = re.compile(r"(transformer|global_transformer)\.layers\.(\d+)\.(.+)")
TEXT_LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def normalize_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 4.x (`language_model.model.*`) and 5.x (`model.language_model.*`) layouts → one form:
    `vision_model.*`, `language_model.*`, `multi_modal_projector.*`, `lm_head.weight`."""
    out = {}
    for key, tensor in state.items():
        k = key.removeprefix("model.")
        k = k.replace("language_model.model.", "language_model.", 1)
        if k == "language_model.lm_head.weight":
            k = "lm_head.weight"
        out[k] = tensor
    return out


def configs_from_hf(config: Mapping, source: str = CONFIG_JSON, semantics: Semantics = "meta",
                    image_token_id: int | None = None) -> tuple[LlamaArgs, VisionConfig, list[int]]:
    """An `MllamaConfig` dict → (LM args, vision config, transformers' cross-attention layer indices).

    `image_token_id` is the in-vocabulary id our tokens use for `<|image|>` (default: the Llama 3
    tokenizer's, 128011 for the released vocabulary)."""
    if config.get("model_type") != "mllama":
        raise CheckpointError(f"{source}: not a Llama 3.2-Vision (mllama) config (model_type={config.get('model_type')!r})")
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
        raise CheckpointError(f"{source}: needs 'text_config' and 'vision_config' objects")
    cross = sorted(text.get("cross_attention_layers") or [])
    total = text.get("num_hidden_layers")
    if not cross or not isinstance(total, int) or cross[-1] >= total:
        raise CheckpointError(f"{source}: text_config.cross_attention_layers {cross} must lie in [0, num_hidden_layers)")
    llama = {**text, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": total - len(cross)}
    lm = args_from_hf_config(llama, f"{source} (text_config)")
    if config.get("image_token_index", lm.vocab_size) != lm.vocab_size:
        raise CheckpointError(f"{source}: image_token_index {config['image_token_index']} must be the first row after "
                              f"the vocabulary ({lm.vocab_size})")
    width, tiles = vision.get("hidden_size", 1280), vision.get("max_num_tiles", 4)
    for key, value in {"hidden_act": "gelu", "num_channels": 3, "norm_eps": 1e-5}.items():
        if vision.get(key, value) != value:
            raise CheckpointError(f"{source}: vision_config.{key} is {vision[key]!r}; only {value!r} is supported")
    ratios = [tuple(r) for r in vision.get("supported_aspect_ratios") or supported_aspect_ratios(tiles)]
    if ratios != list(supported_aspect_ratios(tiles)):
        raise CheckpointError(f"{source}: vision_config.supported_aspect_ratios {ratios} differ from every grid of at "
                              f"most {tiles} tiles in order {list(supported_aspect_ratios(tiles))}")
    taps = list(vision.get("intermediate_layers_indices") or [3, 7, 15, 23, 30])
    if semantics == "transformers":
        taps = [i + 1 for i in taps]
    try:
        encoder = VisionEncoderArgs(
            tile_size=vision.get("image_size", 448), patch_size=vision.get("patch_size", 14), width=width,
            layers=vision.get("num_hidden_layers", 32), heads=vision.get("attention_heads", 16),
            mlp_ratio=vision.get("intermediate_size", 4 * width) / width, attention_bias=False,
            max_num_tiles=tiles, intermediate_layers=taps, n_global_layers=vision.get("num_global_layers", 8))
        # Our layer indices: a cross layer at interleaved index p runs before self-attention layer p − k.
        ours = [p - k for k, p in enumerate(cross)]
        vision_config = VisionConfig(encoder=encoder, cross_attention_layers=ours, image_token_id=image_token_id,
                                     extra_token_rows=8, mask_attention_rows=semantics == "meta")
    except ValueError as e:
        raise CheckpointError(f"{source}: invalid vision config: {e}") from e
    if vision.get("vision_output_dim", encoder.output_dim) != encoder.output_dim:
        raise CheckpointError(f"{source}: vision_output_dim {vision['vision_output_dim']} must be hidden_size × "
                              f"(1 + len(intermediate_layers_indices)) = {encoder.output_dim}")
    return lm, vision_config, cross


def from_mllama_state_dict(state: Mapping[str, torch.Tensor], lm: LlamaArgs, vision: VisionConfig,
                           hf_cross_layers: list[int], source: str = "state dict"
                           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """transformers tensors → (LM tensors in Meta names, the other tensors in `MultimodalModel` names)."""
    enc = vision.encoder
    grids = len(supported_aspect_ratios(enc.max_num_tiles)) + 1
    llama, rest, unknown = {}, {}, []
    cross = set(hf_cross_layers)
    for key, t in normalize_keys(state).items():
        if key.startswith("vision_model."):
            k = key.removeprefix("vision_model.")
            if k in VISION_TOP_KEYS:
                rest[f"vision.{VISION_TOP_KEYS[k]}"] = t
            elif k == "gated_positional_embedding.tile_embedding.weight":
                rest["vision.tile_position_embedding"] = t.reshape(grids, enc.max_num_tiles, enc.tokens_per_tile, enc.width)
            elif k in ("pre_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.embedding.weight"):
                rest[f"vision.{k.split('_tile')[0]}_tile_embedding"] = t.reshape(grids, enc.max_num_tiles, enc.width)
            elif m := VISION_LAYER.fullmatch(k):
                stack, i, r = m.groups()
                prefix = f"vision.vit.transformer.resblocks.{i}." if stack == "transformer" else f"vision.global_layers.{i}."
                if stack == "global_transformer" and r in ("gate_attn", "gate_ffn"):
                    rest[prefix + r] = t
                    continue
                prefix += "" if stack == "transformer" else "block."
                if r in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
                    rest.setdefault(prefix + "attn.in_proj_weight", {})[r[10]] = t  # q / k / v, joined below
                elif r in VISION_BLOCK_KEYS:
                    rest[prefix + VISION_BLOCK_KEYS[r]] = t
                else:
                    unknown.append(key)
            else:
                unknown.append(key)
        elif key.startswith("multi_modal_projector."):
            rest[key.replace("multi_modal_projector.", "vision.projection.", 1)] = t
        elif key == "lm_head.weight":
            llama["lm_head.weight"] = t
        elif key == "language_model.norm.weight":
            llama["model.norm.weight"] = t
        elif key == "language_model.embed_tokens.weight":
            llama["model.embed_tokens.weight"] = t[: lm.vocab_size]
            rest["image_embedding.weight"] = t[lm.vocab_size:]
        elif (m := TEXT_LAYER.fullmatch(key.removeprefix("language_model."))) and key.startswith("language_model."):
            p, r = int(m.group(1)), m.group(2)
            ours = p - sum(c < p for c in cross)  # the self-attention layer index at or after p
            if p in cross:
                if r not in CROSS_KEYS:
                    unknown.append(key)
                    continue
                rest[f"cross_attention.{ours}.{CROSS_KEYS[r]}"] = t
            else:
                llama[f"model.layers.{ours}.{r}"] = t
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unexpected keys {sorted(unknown)[:8]} (not part of a Llama 3.2-Vision model)")
    for key in [k for k, v in rest.items() if isinstance(v, dict)]:
        parts = rest[key]
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: vision attention '{key}' lacks {sorted({'q', 'k', 'v'} - set(parts))}_proj")
        rest[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return from_hf_state_dict(llama, lm), rest


def build_mllama(state: Mapping[str, torch.Tensor], config: Mapping, source: str = "state dict",
                 semantics: Semantics = "meta", device="cpu", dtype=None, image_token_id: int | None = None
                 ) -> MultimodalModel:
    """A `MultimodalModel` holding a transformers Mllama state dict (either key layout) and config dict."""
    if semantics not in ("meta", "transformers"):
        raise ValueError(f"semantics must be 'meta' or 'transformers', got {semantics!r}")
    lm_args, vision, cross = configs_from_hf(config, source, semantics, image_token_id)
    lm_state, rest = from_mllama_state_dict(state, lm_args, vision, cross, source)
    lm = build_model(lm_args, lm_state, source, device, dtype)
    with torch.device("meta"):
        model = MultimodalModel(lm, vision)
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("lm.")}
    check_state_dict({k: v.shape for k, v in rest.items()}, expected, source)
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in rest.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    return model.eval()


def load_mllama(folder: str | Path, device="cpu", dtype=None, semantics: Semantics = "meta",
                image_token_id: int | None = None) -> MultimodalModel:
    """Load a Hugging Face Llama 3.2-Vision folder (`config.json` + safetensors) into a `MultimodalModel`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such Hugging Face checkpoint folder")
    config_path = folder / CONFIG_JSON
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: missing {CONFIG_JSON}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    state, source = read_hf_weights(folder)
    return build_mllama(state, config, source, semantics, device, dtype, image_token_id)


def tokens_from_hf(input_ids: torch.Tensor, hf_image_token_index: int, image_token_id: int) -> torch.Tensor:
    """transformers' ids (`<|image|>` = vocab size, 128256) → ours (`<|image|>` = the tokenizer's id, 128011)."""
    return torch.where(input_ids == hf_image_token_index, torch.full_like(input_ids, image_token_id), input_ids)

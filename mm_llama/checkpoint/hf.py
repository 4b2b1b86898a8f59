"""The Hugging Face `transformers` Llama layout: `config.json` plus safetensors weights.

Weights are one `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards listed in
`model.safetensors.index.json`. Keys are Meta's under another name, except for one real change:
Meta rotates *adjacent* pairs (x[2i], x[2i+1]) of each head, `transformers` rotates the two *halves*
(x[i], x[i + head_dim/2]) (`rotate_half`), so the rows of `wq` and `wk` are permuted within each head.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..model.args import LlamaArgs
from ..model.llama import Transformer
from .native import (
    CheckpointError,
    atomic_folder,
    build_model,
    check_state_dict,
    expected_shapes,
    export_state_dict,
    read_safetensors,
    require_file,
    write_safetensors,
)

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# Meta key (after `layers.{i}.`) → Hugging Face key (after `model.layers.{i}.`).
LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Old exports saved the rotary frequencies as a buffer; they are recomputed from the config.
HF_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Llama 3's tokenizer puts its 256 special tokens after the BPE ranks, <|begin_of_text|> first.
N_SPECIAL_TOKENS = 256
# (multiple_of, ffn_dim_multiplier) pairs of Meta's releases, tried before a generic choice.
META_FFN_RULES = ((256, None), (4096, 1.3), (1024, 1.3), (4096, 1.2), (256, 1.5), (256, 1.0))


# ---------------------------------------------------------------- rotary permutation


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """`wq`/`wk` `[heads·head_dim, dim]`: per head, interleaved pairs → halves (even rows, then odd)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `meta_to_hf_rows`: per head, halves → interleaved pairs."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------- state dicts


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """Meta-named tensors → `transformers` names, `wq`/`wk` permuted; no `lm_head` when tied."""
    out = {}
    for key, tensor in state_dict.items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        if m := META_LAYER.fullmatch(key):
            i, rest = m.groups()
            if rest not in LAYER_KEYS:
                raise CheckpointError(f"no Hugging Face name for '{key}'")
            if rest == "attention.wq.weight":
                tensor = meta_to_hf_rows(tensor, args.n_heads)
            elif rest == "attention.wk.weight":
                tensor = meta_to_hf_rows(tensor, args.kv_heads)
            out[f"model.layers.{i}.{LAYER_KEYS[rest]}"] = tensor
        elif key in TOP_KEYS:
            out[TOP_KEYS[key]] = tensor
        else:
            raise CheckpointError(f"no Hugging Face name for '{key}'")
    return out


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], args: LlamaArgs) -> dict[str, torch.Tensor]:
    """`transformers`-named tensors → Meta names, `q_proj`/`k_proj` permuted back; tied `lm_head` dropped."""
    layer_keys = {v: k for k, v in LAYER_KEYS.items()}
    top_keys = {v: k for k, v in TOP_KEYS.items()}
    out, unknown = {}, []
    for key, tensor in state_dict.items():
        if HF_DERIVED.fullmatch(key) or (key == "lm_head.weight" and args.tie_embeddings):
            continue
        if (m := HF_LAYER.fullmatch(key)) and m.group(2) in layer_keys:
            i, rest = m.groups()
            if rest == "self_attn.q_proj.weight":
                tensor = hf_to_meta_rows(tensor, args.n_heads)
            elif rest == "self_attn.k_proj.weight":
                tensor = hf_to_meta_rows(tensor, args.kv_heads)
            out[f"layers.{i}.{layer_keys[rest]}"] = tensor
        elif key in top_keys:
            out[top_keys[key]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys {sorted(unknown)} (not part of a Llama language model)")
    return out


# ---------------------------------------------------------------- config.json


def special_token_ids(vocab_size: int) -> tuple[int, int]:
    """(<|begin_of_text|>, <|end_of_text|>) of a Llama 3-style tokenizer with this vocabulary."""
    first = max(vocab_size - N_SPECIAL_TOKENS, 0)
    return first, min(first + 1, vocab_size - 1)


def hf_config_from_args(args: LlamaArgs, dtype: torch.dtype = torch.float32) -> dict:
    """`LlamaArgs` → a `LlamaConfig` dict, in the `rope_theta`/`rope_scaling` form every version reads."""
    bos, eos = special_token_ids(args.vocab_size)
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": args.rope_scale_factor,
            "low_freq_factor": args.rope_low_freq_factor,
            "high_freq_factor": args.rope_high_freq_factor,
            "original_max_position_embeddings": args.rope_original_context,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def ffn_rule(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's FFN rule give exactly `intermediate_size`."""
    for multiple_of, multiplier in META_FFN_RULES:
        args = LlamaArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier)
        if args.hidden_dim == intermediate_size:
            return multiple_of, multiplier
    # With multiple_of = intermediate_size the rule rounds any width in (0, intermediate_size] up to it.
    base = int(2 * (4 * dim) / 3)
    return intermediate_size, None if base <= intermediate_size else intermediate_size / base


def _rope_fields(config: dict, source: str) -> dict:
    """Our rotary fields from `rope_parameters` (transformers ≥ 5) or `rope_theta` + `rope_scaling`."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{source}: 'rope_scaling' must be an object or null, got {rope!r}")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "use_scaled_rope": False}
    if kind != "llama3":
        raise CheckpointError(f"{source}: rope_type '{kind}' is not supported (only 'default' and 'llama3')")
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in rope]
    if missing:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks {missing}")
    return {
        "rope_theta": theta,
        "use_scaled_rope": True,
        "rope_scale_factor": rope["factor"],
        "rope_low_freq_factor": rope["low_freq_factor"],
        "rope_high_freq_factor": rope["high_freq_factor"],
        "rope_original_context": rope["original_max_position_embeddings"],
    }


def args_from_hf_config(config: dict, source: str = CONFIG_JSON) -> LlamaArgs:
    """A `LlamaConfig` dict → `LlamaArgs`; anything our decoder cannot reproduce is an error."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(config).__name__}")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in config]
    if missing:
        raise CheckpointError(f"{source}: missing required keys {missing}")
    architectures = config.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures or config.get("model_type", "llama") != "llama":
        raise CheckpointError(
            f"{source}: not a Llama language model (model_type={config.get('model_type')!r}, "
            f"architectures={architectures})"
        )
    must = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    for key, value in must.items():
        if config.get(key, value) != value:
            raise CheckpointError(f"{source}: '{key}' is {config[key]!r}; only {value!r} is supported")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // heads):
        raise CheckpointError(f"{source}: 'head_dim' {config['head_dim']} must equal hidden_size / "
                              f"num_attention_heads = {dim // heads}")
    try:
        multiple_of, multiplier = ffn_rule(dim, config["intermediate_size"])
        return LlamaArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=config.get("num_key_value_heads") or heads,
            vocab_size=config["vocab_size"],
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            max_seq_len=config.get("max_position_embeddings", 2048),
            tie_embeddings=config.get("tie_word_embeddings", False),
            **_rope_fields(config, source),
        )
    except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
        raise CheckpointError(f"{source}: invalid Llama config: {e}") from e


# ---------------------------------------------------------------- folders


def _read_json(path: Path, what: str) -> dict:
    require_file(path, what)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_hf_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of a Hugging Face folder (single file or indexed shards), and where they came from."""
    index_path = folder / INDEX
    if index_path.is_file():
        index = _read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        state = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"{index_path}: names shard '{shard}', which is missing from {folder}")
            tensors = read_safetensors(folder / shard)
            listed = {k for k, v in weight_map.items() if v == shard}
            if listed != tensors.keys():
                diff = sorted(listed ^ tensors.keys())
                raise CheckpointError(f"{folder / shard}: contents disagree with {index_path.name} on keys {diff}")
            state.update(tensors)
        return state, str(index_path)
    if (folder / WEIGHTS).is_file():
        return read_safetensors(folder / WEIGHTS), str(folder / WEIGHTS)
    if any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: only safetensors weights are read (pickled *.bin files are unsafe); "
                              "re-save with safe_serialization=True")
    raise FileNotFoundError(f"{folder}: missing {WEIGHTS} (or {INDEX})")


def load_hf(folder: str | Path, device="cpu", dtype=None) -> Transformer:
    """Load a Hugging Face Llama folder into our `Transformer`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such Hugging Face checkpoint folder")
    config_path = folder / CONFIG_JSON
    args = args_from_hf_config(_read_json(config_path, "Hugging Face config.json"), str(config_path))
    hf_state, source = read_hf_weights(folder)
    for key in [k for k in hf_state if HF_DERIVED.fullmatch(k)]:
        del hf_state[key]
    if args.tie_embeddings and "lm_head.weight" in hf_state:
        # Some exports keep the tied head: accept it only when it really is the embedding.
        if not torch.equal(hf_state["lm_head.weight"], hf_state.get("model.embed_tokens.weight", torch.empty(0))):
            raise CheckpointError(f"{source}: tie_word_embeddings is true but 'lm_head.weight' differs "
                                  "from 'model.embed_tokens.weight'")
        del hf_state["lm_head.weight"]
    expected = to_hf_state_dict({k: torch.empty(s, device="meta") for k, s in expected_shapes(args).items()}, args)
    check_state_dict({k: v.shape for k, v in hf_state.items()}, {k: v.shape for k, v in expected.items()}, source)
    return build_model(args, from_hf_state_dict(hf_state, args), source, device, dtype)


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in key order, each shard ≤ max_bytes unless one tensor alone is larger."""
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    return [*shards, current]


def save_hf(model: Transformer, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write `config.json` and safetensors weights atomically, split into shards above `max_shard_bytes`."""
    args = model.args
    state = to_hf_state_dict(export_state_dict(model), args)
    dtype = next(iter(state.values())).dtype
    total = sum(t.numel() * t.element_size() for t in state.values())
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / CONFIG_JSON).write_text(json.dumps(hf_config_from_args(args, dtype), indent=2) + "\n")
        shards = _shards(state, max_shard_bytes) if max_shard_bytes and total > max_shard_bytes else [state]
        if len(shards) == 1:
            write_safetensors(state, tmp / WEIGHTS)
        else:
            weight_map = {}
            for k, shard in enumerate(shards, start=1):
                name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(shard, tmp / name)
                weight_map.update(dict.fromkeys(shard, name))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder


def shard_bytes_for(model: Transformer, num_files: int) -> int:
    """A `max_shard_bytes` that splits the model into at most `num_files` files of similar size."""
    sizes = [t.numel() * t.element_size() for t in export_state_dict(model).values()]
    # Greedy packing closes a file only once it holds more than total/num_files bytes.
    return math.ceil(sum(sizes) / num_files) + max(sizes)

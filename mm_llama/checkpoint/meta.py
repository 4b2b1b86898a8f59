"""Meta's release layout: `params.json` plus `consolidated.00.pth … consolidated.NN.pth`.

Each `.pth` holds one model-parallel rank's slice of every matrix, split as Meta's reference model
(`models/llama3/model.py` in meta-llama/llama-models) builds its layers with fairscale:

- column-parallel (output rows split, dim 0): `attention.wq/wk/wv`, `feed_forward.w1/w3`, `output`;
- row-parallel (input columns split, dim 1): `attention.wo`, `feed_forward.w2`;
- `tok_embeddings` is a `VocabParallelEmbedding`: split over the vocabulary, dim 0;
- the RMSNorm weights are replicated on every rank.

`params.json` uses our `LlamaArgs` names. It has no tie flag: Llama 3.2 1B/3B ship the shared matrix
under both `tok_embeddings.weight` and `output.weight`, so equal (or absent) `output.weight` means tied.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from pydantic import ValidationError

from ..config.errors import explain
from ..model.args import LlamaArgs
from ..model.llama import Transformer
from .native import CheckpointError, atomic_folder, build_model, export_state_dict, require_file

PARAMS_JSON = "params.json"
SHARD = re.compile(r"consolidated\.(\d+)\.pth")

COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")

# Keys of a Llama 3.2 Vision params.json that describe the image path, not the language model.
VISION_KEYS = {"vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers", "vision_model"}
# In a Llama 3.2 Vision checkpoint the LM lives under `text_model.`, beside these non-LM tensors.
VISION_PREFIXES = ("vision_model.", "text_model.cross_attention_layers.", "text_model.learnable_embedding.")
# params.json has no context length: Llama 3 has 8K; 3.1 and later (scaled rope) have 128K.
META_CONTEXT = {False: 8192, True: 131072}


def split_dim(key: str) -> int | None:
    """The dimension Meta's model parallelism splits `key` along; None when replicated."""
    if key.endswith(COLUMN_PARALLEL):
        return 0
    if key.endswith(ROW_PARALLEL):
        return 1
    return None


def args_from_params(params: dict, source: str = PARAMS_JSON) -> LlamaArgs:
    """`params.json` → `LlamaArgs`; vision keys are set aside with a warning, unknown keys are errors."""
    params = dict(params)
    vision = sorted(VISION_KEYS & params.keys())
    if vision:
        warnings.warn(f"{source}: ignoring {vision}: they describe the Llama 3.2 Vision image path, "
                      "not the language model loaded here", stacklevel=3)
        for k in vision:
            del params[k]
    if "tie_embeddings" in params:
        raise CheckpointError(f"{source}: unknown key 'tie_embeddings' (Meta's layout ties by storing equal matrices)")
    params.setdefault("max_seq_len", META_CONTEXT[bool(params.get("use_scaled_rope", False))])
    try:
        return LlamaArgs.model_validate(params)
    except ValidationError as e:
        raise explain(e, LlamaArgs, source) from None


def params_from_args(args: LlamaArgs) -> dict:
    """`LlamaArgs` → `params.json` (Meta's reference code ignores the fields it does not know)."""
    return args.model_dump(exclude={"tie_embeddings"})


def _read_params(folder: Path) -> dict:
    path = require_file(folder / PARAMS_JSON, "Meta params.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(params).__name__}")
    return params


def shard_files(folder: Path) -> list[Path]:
    """`consolidated.00.pth … consolidated.NN.pth`, checked to be numbered without gaps."""
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := SHARD.fullmatch(p.name))}
    if not found:
        raise FileNotFoundError(f"{folder}: no consolidated.NN.pth weight files")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise FileNotFoundError(f"{folder}: missing model-parallel shards {missing}")
    return [found[i] for i in sorted(found)]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return state


def merge_shards(shards: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """One state dict from model-parallel slices, concatenated along each key's split dimension."""
    merged = {}
    for key in shards[0]:
        parts = []
        for shard, name in zip(shards, names):
            if key not in shard:
                raise CheckpointError(f"{name}: missing key '{key}' (present in {names[0]})")
            parts.append(shard[key])
        dim = split_dim(key)
        merged[key] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    for shard, name in zip(shards[1:], names[1:]):
        extra = sorted(shard.keys() - shards[0].keys())
        if extra:
            raise CheckpointError(f"{name}: unexpected keys {extra} (absent from {names[0]})")
    return merged


def _language_model_only(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip a Llama 3.2 Vision checkpoint to its LM tensors, renamed to the plain LM's keys."""
    if not any(k.startswith("text_model.") for k in state):
        return state
    skipped = [p + "*" for p in VISION_PREFIXES if any(k.startswith(p) for k in state)]
    warnings.warn(f"{source}: loading the language model only; ignoring the tensors {skipped}", stacklevel=3)
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.startswith(VISION_PREFIXES)}


def load_meta(folder: str | Path, device="cpu", dtype=None) -> Transformer:
    """Load a Meta folder (any number of model-parallel shards) into one `Transformer`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such Meta checkpoint folder")
    args = args_from_params(_read_params(folder), str(folder / PARAMS_JSON))
    files = shard_files(folder)
    state = merge_shards([_load_shard(f) for f in files], [str(f) for f in files])
    state = _language_model_only(state, str(folder))
    state.pop("rope.freqs", None)  # a precomputed rotary buffer older releases saved; we recompute it
    embeddings, out = state.get("tok_embeddings.weight"), state.get("output.weight")
    tied = embeddings is not None and (out is None or torch.equal(out, embeddings))
    if tied:
        state.pop("output.weight", None)
    args = args.model_copy(update={"tie_embeddings": tied})
    return build_model(args, state, f"{folder} ({', '.join(f.name for f in files)})", device, dtype)


def save_meta(model: Transformer, folder: str | Path, num_shards: int = 1) -> Path:
    """Write `params.json` and `num_shards` model-parallel `consolidated.NN.pth` files atomically."""
    args = model.args
    if num_shards < 1:
        raise CheckpointError(f"{folder}: num_shards must be at least 1, got {num_shards}")
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "ffn hidden_dim": args.hidden_dim,
             "vocab_size": args.vocab_size}
    bad = {k: v for k, v in sizes.items() if v % num_shards}
    if bad:
        raise CheckpointError(f"{folder}: cannot split into {num_shards} model-parallel shards: {bad} not divisible")
    state = export_state_dict(model)
    if args.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]  # Meta's code always loads an output matrix
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / PARAMS_JSON).write_text(json.dumps(params_from_args(args), indent=2) + "\n")
        for rank in range(num_shards):
            shard = {}
            for key, tensor in state.items():
                dim = split_dim(key)
                part = tensor if dim is None else tensor.chunk(num_shards, dim=dim)[rank]
                shard[key] = part.detach().contiguous().clone()  # a view would save the whole storage
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")
    return folder

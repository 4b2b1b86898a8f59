"""`from_pretrained`: load any supported checkpoint, whatever its layout, text-only or composed."""
from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig
from ..model.llama import Transformer
from .hf import CONFIG_JSON, load_hf
from .meta import PARAMS_JSON, SHARD, load_meta
from .native import CHECKPOINTS, MODEL_SAFETENSORS, MODEL_YAML, load_native

LAYOUTS = ("native", "run", "meta", "hf")


def detect_layout(path: str | Path) -> str:
    """'native' (a checkpoint folder), 'run' (a run directory), 'meta' or 'hf', from the files present."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a checkpoint folder, got a file")
    if (path / MODEL_YAML).is_file() or ((path / MODEL_SAFETENSORS).is_file() and not (path / CONFIG_JSON).is_file()):
        return "native"
    if (path / CHECKPOINTS).is_dir():
        return "run"
    if (path / PARAMS_JSON).is_file() or any(SHARD.fullmatch(p.name) for p in path.iterdir()):
        return "meta"
    if (path / CONFIG_JSON).is_file():
        return "hf"
    raise FileNotFoundError(
        f"{path}: not a checkpoint: expected {MODEL_YAML} + {MODEL_SAFETENSORS} (native), a {CHECKPOINTS}/ folder "
        f"(run directory), {PARAMS_JSON} + consolidated.NN.pth (Meta) or {CONFIG_JSON} + safetensors (Hugging Face)"
    )


def load_checkpoint(path: str | Path, device="cpu", dtype=None) -> tuple[Transformer, ModelConfig]:
    """The model and a `ModelConfig` for it (named after the folder unless the checkpoint stores one)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout in ("native", "run"):
        return load_native(path, device, dtype)
    model = load_meta(path, device, dtype) if layout == "meta" else load_hf(path, device, dtype)
    return model, ModelConfig(name=path.resolve().name, lm=model.args)


def from_pretrained(path: str | Path, device="cpu", dtype=None):
    """Load a model in eval mode: a native checkpoint or run directory, a Meta folder or a Hugging Face folder
    (a `Transformer`), or a composed model written by our stages — a `MultimodalModel` (image; also a Hugging
    Face Llama 3.2-Vision folder) or a `SpeechLM` (speech), told apart by the `vision:`/`speech:` section of
    its `model.yaml`.

    `dtype` casts every tensor (default: as stored); `model(tokens [batch, seq])` → logits `[batch, seq, vocab]`
    (composed models take their media as keyword arguments).
    """
    # Composed models are assembled in `infer.loading` (which builds on this module's `load_checkpoint`).
    from ..infer.loading import load_model

    return load_model(path, device, dtype)[0]

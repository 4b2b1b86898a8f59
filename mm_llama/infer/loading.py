"""Models and tokenizers for inference: text LMs, composed image–text and speech–text models, what each can take.

The checkpoint package loads text LMs in every layout. A composed model stored natively (by
`save_multimodal` or by a training stage) is a folder whose `model.yaml` has a `vision:` or a `speech:`
section and whose `model.safetensors` holds the composed model's state dict as it is: `lm.<Meta key>` plus
`vision.*`, `cross_attention.<layer>.*`, `image_embedding.weight` (image) or `speech_encoder.*`,
`speech_adapter.*` (speech); a tensor shared under two names (a tied LM output matrix) is stored once, under
its first name (`lm.tok_embeddings.weight`). A Hugging Face Llama 3.2-Vision folder (`config.json` with
`model_type: mllama`) loads through `checkpoint.mllama`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.hf import CONFIG_JSON
from ..checkpoint.mllama import load_mllama
from ..checkpoint.native import (
    MODEL_SAFETENSORS,
    MODEL_YAML,
    CheckpointError,
    atomic_folder,
    check_state_dict,
    is_native_checkpoint,
    is_run_dir,
    read_safetensors,
    require_file,
    run_dir_model,
    write_safetensors,
)
from ..checkpoint.pretrained import detect_layout, load_checkpoint
from ..config import ModelConfig, dump_config, load_config
from ..model import Transformer
from ..model.multimodal import MultimodalModel
from ..model.speech_lm import SpeechLM
from ..text import Tokenizer, load_tokenizer

TOKENIZER_FILE = "tokenizer.model"
RUN_CONFIG = "config.yaml"


@dataclass(frozen=True)
class Capabilities:
    """Which inputs beyond text a model takes."""

    image: bool = False
    audio: bool = False
    video: bool = False

    @classmethod
    def of(cls, model) -> "Capabilities":
        composed = isinstance(model, MultimodalModel)
        return cls(image=composed, audio=isinstance(model, SpeechLM),
                   video=composed and model.video_config is not None)

    def require(self, kind: str) -> None:
        """Raise `UnsupportedInput` unless this model takes `kind` ("image", "audio" or "video")."""
        if not getattr(self, kind):
            encoder = {"image": "vision", "audio": "speech", "video": "video"}[kind]
            raise UnsupportedInput(f"{kind} input is not supported by this model: it has no {encoder} encoder")


class UnsupportedInput(ValueError):
    """The request holds a kind of input (image, audio, video) the loaded model cannot take."""


def _composed_keys(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The composed model's state dict with a tensor shared under two names kept once, under its first."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            state[name] = tensor.detach()
    return state


def save_multimodal(model: MultimodalModel, config: ModelConfig, folder: str | Path) -> Path:
    """Write a composed model as `folder/model.yaml` + `folder/model.safetensors`, atomically."""
    if config.vision is None or config.lm != model.args or config.vision != model.config:
        raise CheckpointError(f"{folder}: config (lm and vision) does not describe the model")
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        (tmp / MODEL_YAML).write_text(dump_config(config))
        write_safetensors(_composed_keys(model), tmp / MODEL_SAFETENSORS)
    return folder


def load_composed(folder: str | Path, config: ModelConfig, device="cpu", dtype=None) -> MultimodalModel | SpeechLM:
    """A composed model from a native folder whose `model.yaml` (already read into `config`) has a `vision:`
    or a `speech:` section; the stored keys must be exactly the model's (an error names the differences)."""
    weights = Path(folder) / MODEL_SAFETENSORS
    if config.vision is not None and config.speech is not None:
        raise CheckpointError(f"{folder / MODEL_YAML}: a model with both vision and speech is not supported yet")
    state = read_safetensors(weights)
    with torch.device("meta"):
        if config.vision is not None:
            # The stored weights already hold the backbone: never re-read an open_clip file named in the config.
            encoder = config.vision.encoder.model_copy(update={"checkpoint": None})
            model = MultimodalModel(config.lm, config.vision.model_copy(update={"encoder": encoder}), config.video)
        else:
            model = SpeechLM(config.lm, config.speech)
    check_state_dict({k: v.shape for k, v in state.items()}, {k: v.shape for k, v in _composed_keys(model).items()},
                     str(weights))
    tensors = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(tensors, strict=not config.lm.tie_embeddings, assign=True)
    if config.lm.tie_embeddings:
        model.lm.output.weight = model.lm.tok_embeddings.weight
    return model


def load_multimodal(folder: str | Path, config: ModelConfig, device="cpu", dtype=None) -> MultimodalModel:
    """A composed image–text model from a native folder whose `model.yaml` (read into `config`) has `vision:`."""
    if config.vision is None:
        raise CheckpointError(f"{Path(folder) / MODEL_YAML}: has no vision section")
    return load_composed(folder, config, device, dtype)


def load_model(path: str | Path, device="cpu", dtype=None) -> tuple[Transformer | MultimodalModel | SpeechLM, str]:
    """Any text checkpoint (native, run directory, Meta, Hugging Face) and composed ones (native image or
    speech models, Hugging Face mllama); returns (model in eval mode, its name)."""
    path = Path(path)
    if not path.is_dir():
        detect_layout(path)  # raises, naming what is there instead
    folder = run_dir_model(path) if is_run_dir(path) and not is_native_checkpoint(path) else path
    if (folder / MODEL_YAML).is_file():
        config = load_config(ModelConfig, folder / MODEL_YAML)
        if config.vision is not None or config.speech is not None:
            return load_composed(folder, config, device, dtype).eval(), config.name
    elif (folder / CONFIG_JSON).is_file() and _hf_model_type(folder) == "mllama":
        return load_mllama(folder, device, dtype).eval(), path.resolve().name
    model, config = load_checkpoint(path, device, dtype)
    return model.eval(), config.name


def _hf_model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / CONFIG_JSON).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{folder / CONFIG_JSON}: not a readable JSON object ({e})") from e


def find_tokenizer(checkpoint: str | Path, explicit: str | Path | None = None) -> Tokenizer:
    """The tokenizer given, else `tokenizer.model` in the checkpoint folder, else the one the training run
    that wrote it used (`data.root`/`data.tokenizer` of the run's `config.yaml`, relative to the cwd)."""
    if explicit is not None:
        return load_tokenizer(explicit)
    checkpoint = Path(checkpoint)
    tried = [checkpoint / TOKENIZER_FILE]
    for run in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        if (run / RUN_CONFIG).is_file():
            data = _yaml(run / RUN_CONFIG).get("data") or {}
            if isinstance(data, dict) and "root" in data:
                tried.append(Path(data["root"]) / data.get("tokenizer", TOKENIZER_FILE))
            break
    for candidate in tried:
        if candidate.is_file():
            return load_tokenizer(candidate)
    raise FileNotFoundError(f"{checkpoint}: no tokenizer found (looked for {', '.join(map(str, tried))}); "
                            "pass --tokenizer PATH")


def _yaml(path: Path) -> dict:
    import yaml

    text = require_file(path, "run config").read_text()
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    return loaded if isinstance(loaded, dict) else {}

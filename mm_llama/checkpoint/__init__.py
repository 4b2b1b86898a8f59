"""Checkpoints in three layouts (native, Meta, Hugging Face) and `from_pretrained` over all of them."""
from .hf import (
    args_from_hf_config,
    from_hf_state_dict,
    hf_config_from_args,
    load_hf,
    save_hf,
    to_hf_state_dict,
)
from .meta import args_from_params, load_meta, params_from_args, save_meta
from .native import CheckpointError, atomic_folder, latest_checkpoint, load_native, run_dir_model, save_native
from .pretrained import LAYOUTS, detect_layout, from_pretrained, load_checkpoint

__all__ = [
    "LAYOUTS",
    "CheckpointError",
    "args_from_hf_config",
    "args_from_params",
    "atomic_folder",
    "detect_layout",
    "from_hf_state_dict",
    "from_pretrained",
    "hf_config_from_args",
    "latest_checkpoint",
    "load_checkpoint",
    "load_hf",
    "load_meta",
    "load_native",
    "params_from_args",
    "run_dir_model",
    "save_hf",
    "save_meta",
    "save_native",
    "to_hf_state_dict",
]

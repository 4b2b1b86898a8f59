"""The image encoder: variable-resolution tiling and a tiled open_clip ViT with gated global layers.

Names are imported on first use: configs import `encoders.vision.args`, and importing open_clip for
every command (text-only ones included) cost seconds of start-up.
"""
import importlib

_WHERE = {
    "VisionEncoderArgs": "args",
    "GatedBlock": "encoder",
    "VisionEncoder": "encoder",
    "read_open_clip_checkpoint": "encoder",
    "CLIP_MEAN": "transform",
    "CLIP_STD": "transform",
    "best_canvas": "transform",
    "fit_size": "transform",
    "stack_images": "transform",
    "supported_aspect_ratios": "transform",
    "tile_image": "transform",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)

"""The image encoder: variable-resolution tiling and a tiled open_clip ViT with gated global layers."""
from .args import VisionEncoderArgs
from .encoder import GatedBlock, VisionEncoder, read_open_clip_checkpoint
from .transform import CLIP_MEAN, CLIP_STD, best_canvas, fit_size, stack_images, supported_aspect_ratios, tile_image

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "GatedBlock",
    "VisionEncoder",
    "VisionEncoderArgs",
    "best_canvas",
    "fit_size",
    "read_open_clip_checkpoint",
    "stack_images",
    "supported_aspect_ratios",
    "tile_image",
]

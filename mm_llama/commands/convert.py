"""`mm-llama convert SRC DST --to {native,hf,meta}`: rewrite a checkpoint in another layout."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def configure(p):
    p.add_argument("src", help="a native checkpoint or run directory, a Meta folder or a Hugging Face folder")
    p.add_argument("dst", help="the folder to write (written atomically)")
    p.add_argument("--to", required=True, choices=("native", "hf", "meta"), help="the layout to write")
    p.add_argument("--shards", type=int, default=1,
                   help="meta: model-parallel shards (consolidated.NN.pth); hf: at most this many safetensors files")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast the weights (default: keep the stored dtype)")
    p.add_argument("--force", action="store_true", help="replace DST if it already exists")


def run(args) -> int:
    from ..checkpoint import load_checkpoint, save_hf, save_meta, save_native
    from ..checkpoint.hf import shard_bytes_for

    dst = Path(args.dst)
    if args.shards < 1:
        raise ValueError(f"--shards must be at least 1, got {args.shards}")
    if args.shards > 1 and args.to == "native":
        raise ValueError("--shards applies to --to meta or --to hf, not native")
    if dst.resolve() == Path(args.src).resolve():
        raise ValueError(f"{dst}: the destination must differ from the source")
    if dst.exists() and not args.force:
        raise ValueError(f"{dst}: already exists; pass --force to replace it")
    dtype = DTYPES[args.dtype] if args.dtype else None
    model, config = load_checkpoint(args.src, dtype=dtype)
    if args.to == "native":
        save_native(model, config, dst)
    elif args.to == "meta":
        save_meta(model, dst, num_shards=args.shards)
    else:
        save_hf(model, dst, max_shard_bytes=shard_bytes_for(model, args.shards) if args.shards > 1 else None)
    print(f"wrote {dst} ({args.to}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0

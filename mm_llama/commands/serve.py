"""`mm-llama serve CKPT`: OpenAI-compatible chat completions and a web chat page on 127.0.0.1 by default."""
from __future__ import annotations

from .chat import add_model_args


def configure(p):
    from ..infer.media import MediaLimits
    from ..serve.app import ServerLimits

    limits, media = ServerLimits(), MediaLimits()
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model id clients ask for (default: the checkpoint's config name)")
    p.add_argument("--allow-local-images", metavar="DIR",
                   help="also accept image_url paths of files inside DIR (off by default)")
    p.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes)
    p.add_argument("--max-image-pixels", type=int, default=media.max_image_pixels)
    p.add_argument("--max-images", type=int, default=media.max_images)
    p.add_argument("--max-audio-seconds", type=float, default=media.max_audio_seconds)
    p.add_argument("--max-prompt-tokens", type=int, help="default: the model's context length - 1")
    p.add_argument("--max-new-tokens", type=int, default=limits.max_new_tokens)
    p.add_argument("--max-queue", type=int, default=limits.max_queue)
    p.add_argument("--max-batch", type=int, default=limits.max_batch)


def run(args) -> int:
    from ..infer.media import MediaLimits
    from ..serve import ServerLimits, create_app, serve_forever
    from .chat import load_generator

    for key in ("max_body_bytes", "max_image_pixels", "max_images", "max_new_tokens", "max_queue", "max_batch"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    generator, name = load_generator(args)
    media = MediaLimits(args.max_image_pixels, args.max_images, args.max_audio_seconds)
    limits = ServerLimits(args.max_body_bytes, args.max_prompt_tokens, args.max_new_tokens, args.max_queue,
                          args.max_batch, media)
    app = create_app(generator, args.name or name, limits, args.allow_local_images)
    print(f"mm-llama serve: {args.name or name} on http://{args.host}:{args.port}/ (chat page) and "
          f"/v1/chat/completions", flush=True)
    serve_forever(app, args.host, args.port)
    return 0

"""`mm-llama chat CKPT`: terminal chat in the Llama 3 chat format; replies stream as they are generated.

Commands inside the chat: /image PATH, /audio PATH, /video DIR attach media to the next message (an
empty line sends the attachments alone, the speech stage's layout); /reset starts over; /save FILE writes
the dialog as JSON; /help; /quit (or end of input). `--speech-task asr --language English` sets the speech
stage's system prompt ("Repeat after me in English:"; `ast`: "Translate the following sentence into …:").
"""
from __future__ import annotations

import sys

HELP = ("commands: /image PATH  /audio PATH  /video DIR  (attach to the next message; an empty line sends "
        "attachments alone)  /reset  /save FILE  /help  /quit")


def add_model_args(p) -> None:
    p.add_argument("checkpoint", help="native checkpoint or run directory, Meta or Hugging Face folder")
    p.add_argument("--tokenizer", help="tokenizer.model (default: beside the checkpoint, or its run's data)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: as stored)")
    p.add_argument("--compile", action="store_true",
                   help="decode with a torch.compile'd step (compiles at the first reply: minutes on a CPU)")


def load_generator(args):
    import torch

    from ..infer import Generator, find_tokenizer, load_model

    model, name = load_model(args.checkpoint, args.device, getattr(torch, args.dtype) if args.dtype else None)
    return Generator(model, find_tokenizer(args.checkpoint, args.tokenizer), compile=args.compile), name


def configure(p):
    add_model_args(p)
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--speech-task", choices=("asr", "ast"),
                   help="use the speech stage's system prompt for this task (needs --language)")
    p.add_argument("--language", help="the target language of --speech-task, e.g. English")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int)


def run(args) -> int:
    from ..infer import ContextLengthError, MediaError, SamplingConfig, UnsupportedInput
    from ..infer.chat import ChatSession

    system = args.system
    if args.speech_task is not None:
        from ..data.speech import system_prompt

        if args.system is not None:
            raise ValueError("give --system or --speech-task, not both")
        system = system_prompt(args.speech_task, args.language)
    generator, name = load_generator(args)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=tuple(args.stop), seed=args.seed)
    session = ChatSession(generator, config, system)
    interactive = sys.stdin.isatty()
    print(f"mm-llama chat: {name} ({type(generator.model).__name__}). {HELP}", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.rstrip("\n")
        if not line.strip() and not session.pending:
            continue
        command, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        try:
            if command == "/quit":
                return 0
            if command == "/help":
                print(HELP)
            elif command == "/reset":
                session.reset()
                print("(dialog cleared)")
            elif command == "/save":
                print(f"(saved {session.save(_need(arg, '/save FILE'))})")
            elif command in ("/image", "/audio", "/video"):
                attach = {"/image": session.attach_image, "/audio": session.attach_audio,
                          "/video": session.attach_video}[command]
                attach(_need(arg, f"{command} PATH"))
                print(f"(attached {arg} to the next message)")
            elif command.startswith("/") and command[1:].isalpha():
                print(f"unknown command {command}; {HELP}")
            else:
                print("assistant> ", end="", flush=True)
                done = session.send(line if line.strip() else "", on_text=lambda text: print(text, end="", flush=True))
                print("" if done.finish_reason == "stop" else f" [{done.finish_reason}]", flush=True)
        except (MediaError, UnsupportedInput, ContextLengthError, OSError, ValueError) as e:
            print(f"error: {e}", flush=True)


def _need(arg: str, usage: str) -> str:
    if not arg:
        raise ValueError(f"usage: {usage}")
    return arg

"""`make demo`: the built-in demo end to end.

Writes the demo data set (if absent), runs `configs/pipelines/demo.yaml` (every built stage) into the output
folder, prints the evaluation table and a short scripted conversation with the final models: a held-out text
continued, a question about a held-out image, a question about a held-out video clip, a held-out spoken
sentence transcribed, and a held-out question to the post-trained chat model. Every number and answer printed comes from this run.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .cli import main as cli
from .data.demo import DATA_VERSION

DATA = Path("data/demo")
PIPELINE = "configs/pipelines/demo.yaml"


def stage_model(run_dir: Path):
    """(task, model) of a finished stage: the stage's own task builds the model, `final/` fills the weights."""
    from .config import load_config
    from .config.stage import StageConfig
    from .train.checkpointing import load_model_weights
    from .train.tasks import task_for

    cfg = load_config(StageConfig, run_dir / "config.yaml")
    task = task_for(cfg)
    model = task.build_model()
    load_model_weights(model, run_dir / "final")
    return task, model.eval()


@torch.no_grad()
def greedy(forward, prompt: list[int], stop: set[int], max_new_tokens: int) -> list[int]:
    """Argmax continuation through `forward(tokens [1, T]) -> logits`; a few tokens, so no cache is needed."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        nxt = int(forward(torch.tensor([tokens]))[0, -1].argmax())
        if nxt in stop:
            break
        tokens.append(nxt)
    return tokens[len(prompt):]


def show_text(out: Path) -> None:
    from . import from_pretrained, load_tokenizer
    from .infer.generate import generate

    model, tokenizer = from_pretrained(out / "anneal"), load_tokenizer(DATA)
    prompt_text = "The import statement"
    new = generate(model, tokenizer.encode(prompt_text, bos=True, eos=False), max_new_tokens=32,
                   stop_tokens=tokenizer.stop_tokens)
    print(f"[text]   {prompt_text!r} → {prompt_text + tokenizer.decode(new)!r}")


def show_image(out: Path, n: int = 4) -> None:
    task, model = stage_model(out / "vision_anneal")
    batch = task.heldout(task.cfg.train.seq_len, n)[0]
    for i in range(min(n, batch.tokens.shape[0])):
        answer_at = int((batch.labels[i] != -100).nonzero()[0])
        prompt = batch.tokens[i, : answer_at + 1].tolist()
        question = task.tokenizer.decode([t for t in prompt if t < task.tokenizer.n_ranks]).strip()
        images, ratios = batch.images[i : i + 1], batch.aspect_ratios[i : i + 1]
        reply = greedy(lambda t: model(t, images=images, aspect_ratios=ratios), prompt, task.tokenizer.stop_tokens, 6)
        print(f"[image]  held-out image, {batch.kinds[i]} question {question[-60:]!r}: model says "
              f"{task.tokenizer.decode(reply)!r}, truth {batch.answers[i]!r}")


def show_video(out: Path, n: int = 2) -> None:
    """Motion-direction questions about held-out clips, answered by the video stage's model."""
    task, model = stage_model(out / "video_adapter")
    shown = 0
    for batch in task.heldout(task.cfg.train.seq_len, 8):
        for i, kind in enumerate(batch.kinds):
            if kind != "motion" or shown == n:
                continue
            answer_at = int((batch.labels[i] != -100).nonzero()[0])
            prompt = batch.tokens[i, : answer_at + 1].tolist()
            question = task.tokenizer.decode([t for t in prompt if t < task.tokenizer.n_ranks]).strip()
            media = {k: v[i : i + 1] for k, v in batch.media_inputs("cpu").items()}
            reply = greedy(lambda t: model(t, **media), prompt, task.tokenizer.stop_tokens, 6)
            print(f"[video]  held-out clip, {kind} question {question[-60:]!r}: model says "
                  f"{task.tokenizer.decode(reply)!r}, truth {batch.answers[i]!r}")
            shown += 1
        if shown == n:
            return


def show_speech(out: Path, n: int = 2) -> None:
    from .train.tasks.speech_lm import greedy_decode

    task, model = stage_model(out / "speech_adapter")
    shown = 0
    for b in task.heldout(task.cfg.train.seq_len, 4):
        frames, lengths = model.encode_speech(b.feats, b.feat_lengths)
        for i, kind in enumerate(b.tasks):
            if kind != "asr" or shown == n:
                continue
            clip = (frames[i : i + 1, : int(lengths[i])], lengths[i : i + 1])
            ids = greedy_decode(model, b.prompts[i], clip, task.tokenizer.stop_tokens, 24, torch.device("cpu"))
            print(f"[speech] held-out clip: heard {task.tokenizer.decode(ids)!r}, said {b.references[i]!r}")
            shown += 1
        if shown == n:
            return


def show_dialog(out: Path) -> None:
    from . import from_pretrained, load_tokenizer
    from .data.shards import read_shard
    from .infer.generate import generate
    from .text import ChatFormat

    model, tokenizer = from_pretrained(out / "dpo"), load_tokenizer(DATA)
    shard = sorted((DATA / "dialog").glob("prompts-*.tar"))[0]
    record = json.loads(next(iter(read_shard(str(shard), lambda *_: None)))["json"])
    prompt = ChatFormat(tokenizer).encode_dialog(record["messages"], add_generation_prompt=True).tokens
    reply = tokenizer.decode(generate(model, prompt, max_new_tokens=24, stop_tokens=tokenizer.stop_tokens))
    question = record["messages"][-1]["content"]
    print(f"[chat]   held-out question {question!r}: model says {reply!r}"
          + (f", truth {record['answer']!r}" if "answer" in record else ""))


def print_table(metrics: dict[str, float], title: str) -> None:
    from .pipeline.report import REFERENCE_SUFFIXES

    print(f"\n== evaluation of {title}")
    print(f"{'metric':<58}{'model':>10}{'baseline':>10}{'untrained':>10}")
    for key, value in metrics.items():
        if not key.endswith(REFERENCE_SUFFIXES):
            refs = [metrics.get(f"{key}{suffix}") for suffix in REFERENCE_SUFFIXES]
            print(f"{key:<58}{value:>10.3f}" + "".join(f"{'-' if r is None else f'{r:.3f}':>10}" for r in refs))


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("runs/demo")
    start = time.time()
    stamp = DATA / "VERSION"
    if DATA.exists() and (not stamp.exists() or stamp.read_text().strip() != str(DATA_VERSION)):
        print(f"== {DATA} was written by an older version of `mm-llama data demo`: writing it again, and training "
              f"{out} afresh", flush=True)
        shutil.rmtree(DATA)
        shutil.rmtree(out, ignore_errors=True)
    if not (DATA / "tokenizer.model").exists():
        print(f"== writing the demo data set into {DATA}", flush=True)
        if cli(["data", "demo", str(DATA)]) != 0:
            return 1
    if cli(["pipeline", PIPELINE, "--out", str(out)]) != 0:
        return 1
    metrics = json.loads((out / "eval.json").read_text())
    print_table(metrics, "the final models (held-out demo data; baseline = blind, untrained = the stage's "
                         "starting weights)")
    print("\n== a short conversation with the final models")
    for show in (show_text, show_image, show_video, show_speech, show_dialog):
        try:
            show(out)
        except (FileNotFoundError, StopIteration, IndexError) as e:  # a stage the pipeline did not run
            print(f"[{show.__name__[5:]}] skipped: {e}")
    print(f"\nRan the demo data and every stage of {PIPELINE} in {time.time() - start:.0f} s. "
          f"Summary with plots: {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Rejection sampling (SPEC §3.3): K responses per prompt from a policy, the reward model keeps the best.

`mm-llama data rejection-sample CONFIG [key=value ...]` runs `run_rejection_sampling`. Prompts come from
dialog shards (`json` = `{"messages": [...]}` ending with a user turn; other fields are carried along
as `meta`), read in listed order. Generation is batched and KV-cached; each prompt's prefix is run
through the model once, its cache rows copied to its K samples, which then decode side by side (the
paper shares the prompt's KV pages across samples; here the compute is shared and the cache copied).
Every response is scored by the RM after the prompt, as in an SFT dialog, and the best one is written as
an SFT dialog (`{"messages": prompt + [best], "score", "scores", "meta"}`).

Output shard s holds prompts [s·P, (s+1)·P) (P = `prompts_per_shard`) and is written atomically; its
samples are drawn from a generator seeded by (seed, s). A run that stops is resumed by running it
again: finished shards are kept and the next one is redone, so the output equals an uninterrupted run.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..data.accounting import Counters
from ..data.shards import TAR_MTIME, expand_shards, read_shard
from ..data.text_stream import SkipSample, derive_seed, sample_text
from ..infer.decoder import Decoder, padded_attention_mask
from ..infer.sampling import sample_next
from ..model import Transformer
from ..model.reward import RewardModel, load_reward_model
from ..text import ChatFormat, load_tokenizer

SHARD = "sft-{:06d}.tar"


class SamplingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)


class RejectionSamplingConfig(BaseModel):
    """`configs/post/*.yaml`. `policy`: one model, or several of one architecture averaged (SPEC §3.5)."""

    model_config = ConfigDict(extra="forbid")

    policy: str | list[str]
    policy_weights: list[float] | None = None
    reward_model: str
    root: str = "data/demo"  # prompt shards and the tokenizer are relative to it
    tokenizer: str = "tokenizer.model"
    prompts: str | list[str]
    out_dir: str
    samples_per_prompt: int = Field(10, gt=0, description="K (paper: 10-30)")
    prompts_per_batch: int = Field(8, gt=0)
    prompts_per_shard: int = Field(256, gt=0)
    max_prompts: int | None = Field(None, gt=0)
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ------------------------------------------------------------------------------ generation


@torch.inference_mode()
def sample_responses(model: Transformer, prompts: list[list[int]], k: int, options: SamplingOptions,
                     stop_tokens: set[int], banned: list[int], generator: torch.Generator | None) -> list[list[list[int]]]:
    """`k` continuations of each prompt, `[prompt][sample] -> ids` without the stop token.

    The prompts are left-padded into one batch and prefilled once; the cache rows and last logits of
    prompt i are then repeated for its k samples (rows i·k ... i·k + k − 1).
    """
    decoder = Decoder(model)
    dev = decoder.device
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    new = min(options.max_new_tokens, decoder.args.max_seq_len - width)
    if new < 1:
        raise ValueError(f"a prompt of {width} tokens leaves no room in max_seq_len {decoder.args.max_seq_len}")
    n, rows = len(prompts), len(prompts) * k
    pad = torch.tensor([width - m for m in lengths], device=dev)
    tokens = torch.zeros(n, width, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        tokens[i, width - lengths[i]:] = torch.tensor(p, dtype=torch.long)
    valid = torch.arange(width + new, device=dev)[None, :] >= pad[:, None]  # [prompts, cache_len]
    caches = decoder.caches(rows, width + new)
    positions = (torch.arange(width, device=dev)[None, :] - pad[:, None]).clamp(min=0)
    logits = decoder(decoder.embed(tokens), positions, padded_attention_mask(valid, 0, width), caches, 0)
    for cache in caches:  # the shared prefix: prompt i's rows fill its k samples' rows
        for buf in (cache.k, cache.v):
            buf[:, :, :width].copy_(buf[:n, :, :width].clone().repeat_interleave(k, 0))
    logits = logits.repeat_interleave(k, 0)
    valid = valid.repeat_interleave(k, 0)
    next_pos = torch.tensor(lengths, device=dev).repeat_interleave(k)[:, None]
    ban = torch.tensor(banned, dtype=torch.long, device=dev)
    out: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for step in range(new):
        if ban.numel():
            logits[:, ban] = float("-inf")
        chosen = sample_next(logits, options.temperature, options.top_k, options.top_p, generator)
        for r, t in enumerate(chosen.tolist()):
            if not done[r]:
                if t in stop_tokens:
                    done[r] = True
                else:
                    out[r].append(t)
        if all(done) or step == new - 1:
            break
        slot = width + step
        logits = decoder(decoder.embed(chosen[:, None]), next_pos + step, padded_attention_mask(valid, slot, 1),
                         caches, slot)
    return [out[i * k:(i + 1) * k] for i in range(n)]


@torch.no_grad()
def score_responses(rm: RewardModel, chat: ChatFormat, prompt: list[dict], replies: list[str]) -> list[float]:
    """The RM's reward of each reply after the prompt: its logit at the reply's terminator."""
    prompt_ids = chat.encode_dialog(prompt, add_generation_prompt=True).tokens
    header = len(chat.encode_header("assistant"))
    rows = [prompt_ids + chat.encode_message({"role": "assistant", "content": r})[0][header:] for r in replies]
    t = max(map(len, rows))
    dev = next(rm.parameters()).device
    tokens = torch.tensor([r + [chat.tokenizer.pad_id] * (t - len(r)) for r in rows], device=dev)
    logits = rm(tokens)  # right padding: a causal row never sees its padding
    ends = torch.tensor([len(r) - 1 for r in rows], device=dev)
    return logits.gather(1, ends[:, None]).squeeze(1).tolist()


def best_of(scores: list[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


# ------------------------------------------------------------------------------ the command


def read_prompts(cfg: RejectionSamplingConfig, counters: Counters) -> Iterator[tuple[str, list[dict], dict]]:
    """`(key, prompt messages, other fields)` of every usable prompt record, in listed order."""
    urls, missing = expand_shards(cfg.prompts, cfg.root)
    if missing or not urls:
        raise FileNotFoundError(f"prompts: missing shards: {', '.join(missing) or cfg.prompts}")
    for url in urls:
        for sample in read_shard(url, counters.skip):
            try:
                record = json.loads(sample_text(sample, "json"))
                messages = record.get("messages") if isinstance(record, dict) else None
                if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                        or messages[-1].get("role") == "assistant":
                    raise SkipSample("a prompt record is {'messages': [...]} not ending with an assistant turn")
            except (SkipSample, json.JSONDecodeError) as e:
                counters.skip("sample", f"{url} sample '{sample.get('__key__')}': {e}")
                continue
            yield sample["__key__"], messages, {k: v for k, v in record.items() if k != "messages"}


def load_policy(cfg: RejectionSamplingConfig, device) -> Transformer:
    from ..checkpoint.native import build_model
    from .average import average_models

    paths = [cfg.policy] if isinstance(cfg.policy, str) else list(cfg.policy)
    state, config = average_models(paths, cfg.policy_weights)
    return build_model(config.lm, state, str(paths[0]), device).eval()


def _write_shard(path: Path, records: list[tuple[str, dict]]) -> None:
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
        for key, record in records:
            sink.write({"__key__": key, "json": record})
    os.replace(tmp, path)


def run_rejection_sampling(cfg: RejectionSamplingConfig) -> dict:
    """Sample, score, keep the best, write SFT shards under `out_dir`; resumes. Returns the summary."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    tokenizer = load_tokenizer(Path(cfg.root) / cfg.tokenizer)
    chat = ChatFormat(tokenizer)
    policy = load_policy(cfg, device)
    rm = load_reward_model(cfg.reward_model, device)[0].eval()
    stop = set(tokenizer.stop_tokens)
    banned = [t for t in range(tokenizer.n_ranks, policy.args.vocab_size) if t not in stop]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    while (out / SHARD.format(done)).is_file():
        done += 1
    counters = Counters()
    prompts = read_prompts(cfg, counters)
    for _ in range(done * cfg.prompts_per_shard):  # prompts of finished shards
        next(prompts, None)
    seen, shard = done * cfg.prompts_per_shard, done
    while cfg.max_prompts is None or seen < cfg.max_prompts:
        take = cfg.prompts_per_shard if cfg.max_prompts is None else min(cfg.prompts_per_shard, cfg.max_prompts - seen)
        chunk = [p for _, p in zip(range(take), prompts)]
        if not chunk:
            break
        generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "rejection", shard) % 2**63)
        records = []
        for i in range(0, len(chunk), cfg.prompts_per_batch):
            batch = chunk[i:i + cfg.prompts_per_batch]
            ids = [chat.encode_dialog(m, add_generation_prompt=True).tokens for _, m, _ in batch]
            samples = sample_responses(policy, ids, cfg.samples_per_prompt, cfg.sampling, stop, banned, generator)
            for (key, messages, meta), outs in zip(batch, samples):
                replies = [tokenizer.decode(o) for o in outs]
                scores = score_responses(rm, chat, messages, replies)
                best = best_of(scores)
                records.append((key, {"messages": messages + [{"role": "assistant", "content": replies[best]}],
                                      "score": scores[best], "scores": scores, "replies": replies, "meta": meta}))
        _write_shard(out / SHARD.format(shard), records)
        seen, shard = seen + len(chunk), shard + 1
    summary = summarize_output(out)
    summary["skipped_prompts"] = counters.skipped_samples
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize_output(out: Path) -> dict:
    """Counts and mean scores of the written shards; with a `meta.answer` per prompt, how often the kept
    reply is exactly right against how often a random sample is (the effect of rejection sampling)."""
    n = best_total = mean_total = 0.0
    checked = best_right = any_right = 0.0
    shard = 0
    while (out / SHARD.format(shard)).is_file():
        for sample in read_shard(str(out / SHARD.format(shard)), lambda kind, message: None):
            r = json.loads(sample["json"])
            n += 1
            best_total += r["score"]
            mean_total += sum(r["scores"]) / len(r["scores"])
            answer = r["meta"].get("answer")
            if isinstance(answer, str):
                checked += 1
                best_right += r["messages"][-1]["content"].strip() == answer
                any_right += sum(x.strip() == answer for x in r["replies"]) / len(r["replies"])
        shard += 1
    summary = {"prompts": int(n), "shards": shard, "mean_best_score": best_total / max(n, 1),
               "mean_sample_score": mean_total / max(n, 1)}
    if checked:
        summary.update({"checked_prompts": int(checked), "best_accuracy": best_right / checked,
                        "sample_accuracy": any_right / checked})
    return summary


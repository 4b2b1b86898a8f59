"""Generation speed: mm_llama's KV-cached `Generator` against `transformers`' `generate`, same weights.

The same random Llama 3 weights are converted to a Hugging Face `LlamaForCausalLM` in memory
(`checkpoint.hf.to_hf_state_dict` + `hf_config_from_args`). Both decode the same prompt greedily for the
same number of new tokens (no early stop), at batch 1 and optionally larger batches, after one warm-up
run each; every run checks that both produce the same tokens. Reported per model size:

  ttft_ms         time from the call to the first new token (prefill + first sample)
  decode_tok_s    new tokens after the first, per second, summed over the batch (for transformers at batch > 1,
                  where its streamer cannot time the first token, the whole call's rate is used)

    python bench/generate.py [--sizes 30m 300m] [--prompt 128] [--new 64] [--batch 1] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from mm_llama.checkpoint.hf import hf_config_from_args, to_hf_state_dict
from mm_llama.infer import Generator, Prompt, SamplingConfig
from mm_llama.model import Transformer
from mm_llama.model.args import LlamaArgs
from mm_llama.model.init import init_weights

SIZES = {
    # configs/models/bench_30m.yaml
    "30m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4352, multiple_of=256),
    "300m": dict(dim=1024, n_layers=20, n_heads=16, n_kv_heads=8, vocab_size=32768, multiple_of=256),
}


def build(size: str, device: str = "cpu") -> tuple[Transformer, "torch.nn.Module"]:
    from transformers import LlamaConfig, LlamaForCausalLM

    args = LlamaArgs(**SIZES[size], norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False, max_seq_len=2048)
    ours = init_weights(Transformer(args), torch.Generator().manual_seed(0)).eval()
    config = LlamaConfig(**hf_config_from_args(args))
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=False)
    if args.tie_embeddings:
        hf.tie_weights()
    return ours.to(device), hf.to(device)


class FirstTokenClock:
    """A `transformers` streamer: `put` is called with the prompt, then once per new token."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(gen: Generator, prompts: list[list[int]], new: int):
    first = []
    sync()
    start = time.perf_counter()
    out = gen.generate([Prompt(p) for p in prompts], SamplingConfig(max_new_tokens=new, stop_tokens=frozenset()),
                       on_token=lambda e: first or first.append(time.perf_counter()))
    sync()
    end = time.perf_counter()
    return [c.tokens for c in out], first[0] - start, end - first[0]


@torch.inference_mode()
def run_hf(hf, prompts: list[list[int]], new: int):
    clock = FirstTokenClock()
    ids = torch.tensor(prompts, device=hf.device)
    sync()
    start = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, streamer=clock if len(prompts) == 1 else None, pad_token_id=0,
                      eos_token_id=None)
    sync()
    end = time.perf_counter()
    if clock.first is None:  # transformers' streamers take batch 1 only: no first-token time for larger batches
        return out[:, ids.shape[1]:].tolist(), None, (end - start) * (new - 1) / new
    return out[:, ids.shape[1]:].tolist(), clock.first - start, end - clock.first


def measure(size: str, prompt_len: int, new: int, batch: int, repeats: int, device: str = "cpu") -> dict:
    ours, hf = build(size, device)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 4000, (batch, prompt_len), generator=g).tolist()
    gen = Generator(ours)
    row = {"size": size, "device": device, "params": sum(p.numel() for p in ours.parameters()), "batch": batch,
           "prompt": prompt_len, "new_tokens": new}
    for name, fn, model in (("mm_llama", run_ours, gen), ("transformers", run_hf, hf)):
        fn(model, prompts, 4)  # warm-up
        best = None
        for _ in range(repeats):
            tokens, ttft, decode = fn(model, prompts, new)
            if best is None or decode < best[2]:
                best = (tokens, ttft, decode)
        row[name] = {"ttft_ms": round(best[1] * 1000, 1) if best[1] is not None else None,
                     "decode_tok_s": round(batch * (new - 1) / best[2], 1)}
        row[f"{name}_tokens"] = best[0]
    row["same_tokens"] = row.pop("mm_llama_tokens") == row.pop("transformers_tokens")
    row["decode_speedup"] = round(row["mm_llama"]["decode_tok_s"] / row["transformers"]["decode_tok_s"], 2)
    if row["transformers"]["ttft_ms"] is not None:
        row["ttft_speedup"] = round(row["transformers"]["ttft_ms"] / row["mm_llama"]["ttft_ms"], 2)
    return row


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", nargs="+", default=["30m", "300m"], choices=list(SIZES))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        for batch in args.batch:
            print(json.dumps(measure(size, args.prompt, args.new, batch, args.repeats, args.device)), flush=True)


if __name__ == "__main__":
    main()

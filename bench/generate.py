"""Generation speed: mm_llama's KV-cached `Generator` against `transformers`' `generate`, same weights.

The same random Llama 3 weights are converted to a Hugging Face `LlamaForCausalLM` in memory
(`checkpoint.hf.to_hf_state_dict` + `hf_config_from_args`). Both decode the same prompt greedily for the
same number of new tokens (no early stop), at batch 1 and optionally larger batches, after one warm-up
run each; every run checks that both produce the same tokens. The contenders run in turn (a, b, a, b, …)
so that the drift of a shared machine falls on both alike. Reported per model size (medians):

  ttft_ms         time from the call to the first new token (prefill + first sample), wall clock
  ttft_cpu_ms     the same in this process's CPU time
  decode_tok_s    new tokens after the first, per second of wall clock, summed over the batch
  decode_cpu_tok_s  the same per second of this process's CPU time: on a shared machine, where other
                  processes take the cores away, the steadier figure (with one thread it is the work done)
  decode_speedup  ours / transformers on decode_cpu_tok_s (CPU) or decode_tok_s (CUDA)
  compile_s       with --compile: the warm-up call's wall time (compilation of the decode step included),
                  excluded from every other figure

transformers' streamers take batch 1 only, so at larger batches its first token is not timed and its
decode rate is the whole call's, scaled by (new - 1) / new.

    python bench/generate.py [--sizes 30m 300m] [--prompt 128] [--new 64] [--batch 1] [--threads 1]
                             [--repeats 5] [--device cpu|cuda] [--dtype float32|bfloat16] [--compile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402  (before torch: OpenMP reads its wait policy once)

import torch  # noqa: E402

from mm_llama.checkpoint.hf import hf_config_from_args, to_hf_state_dict  # noqa: E402
from mm_llama.infer import Generator, Prompt, SamplingConfig  # noqa: E402
from mm_llama.model import Transformer  # noqa: E402
from mm_llama.model.args import LlamaArgs  # noqa: E402
from mm_llama.model.init import init_weights  # noqa: E402

SIZES = {
    # configs/models/bench_30m.yaml
    "30m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4352, multiple_of=256),
    "300m": dict(dim=1024, n_layers=20, n_heads=16, n_kv_heads=8, vocab_size=32768, multiple_of=256),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build(size: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Transformer, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    args = LlamaArgs(**SIZES[size], norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=False, max_seq_len=2048)
    ours = init_weights(Transformer(args), torch.Generator().manual_seed(0)).eval()
    config = LlamaConfig(**hf_config_from_args(args))
    config._attn_implementation = "sdpa"
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=False)
    if args.tie_embeddings:
        hf.tie_weights()
    return ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)


class Clock:
    """Wall and CPU time at the start, at the first new token and at the end of one call."""

    def __init__(self, device: str):
        self.device = device
        self.start = self.first = self.end = None

    def now(self) -> tuple[float, float]:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter(), time.process_time()

    def begin(self):
        self.start = self.now()

    def token(self):
        if self.first is None:
            self.first = self.now()

    def finish(self):
        self.end = self.now()


class FirstTokenStreamer:
    """A `transformers` streamer: `put` is called with the prompt, then once per new token."""

    def __init__(self, clock: Clock):
        self.clock, self.calls = clock, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.clock.token()

    def end(self):
        pass


def run_ours(gen: Generator, prompts: list[list[int]], new: int, clock: Clock) -> list[list[int]]:
    config = SamplingConfig(max_new_tokens=new, stop_tokens=frozenset())
    clock.begin()
    out = gen.generate([Prompt(p) for p in prompts], config, on_token=lambda e: clock.token())
    clock.finish()
    return [c.tokens for c in out]


@torch.inference_mode()
def run_hf(hf, prompts: list[list[int]], new: int, clock: Clock) -> list[list[int]]:
    ids = torch.tensor(prompts, device=hf.device)
    streamer = FirstTokenStreamer(clock) if len(prompts) == 1 else None
    clock.begin()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                      do_sample=False, streamer=streamer, pad_token_id=0, eos_token_id=None)
    clock.finish()
    return out[:, ids.shape[1]:].tolist()


def decode_times(clock: Clock, new: int) -> tuple[tuple[float, float] | None, float, float]:
    """((ttft wall, ttft CPU) seconds or None, decode wall seconds, decode CPU seconds), the decode times
    for the new tokens after the first."""
    if clock.first is None:  # no first-token time: the whole call, scaled to new - 1 tokens
        scale = (new - 1) / new
        return None, (clock.end[0] - clock.start[0]) * scale, (clock.end[1] - clock.start[1]) * scale
    ttft = (clock.first[0] - clock.start[0], clock.first[1] - clock.start[1])
    return ttft, clock.end[0] - clock.first[0], clock.end[1] - clock.first[1]


def measure(size: str, prompt_len: int, new: int, batch: int, repeats: int, device: str = "cpu",
            dtype: torch.dtype = torch.float32, compile: bool = False) -> dict:
    ours, hf = build(size, device, dtype)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 4000, (batch, prompt_len), generator=g).tolist()
    contenders = {"mm_llama": (run_ours, Generator(ours, compile=compile)), "transformers": (run_hf, hf)}
    warmup = {}
    for name, (fn, model) in contenders.items():  # warm-up at the measured shapes (a compiled step's too)
        clock = Clock(device)
        fn(model, prompts, new, clock)
        warmup[name] = clock.end[0] - clock.start[0]
    times: dict[str, list] = {name: [] for name in contenders}
    tokens: dict[str, list] = {}
    for _ in range(repeats):
        for name, (fn, model) in contenders.items():
            clock = Clock(device)
            tokens[name] = fn(model, prompts, new, clock)
            times[name].append(decode_times(clock, new))
    row = {"size": size, "device": device, "dtype": str(dtype).removeprefix("torch."),
           "params": sum(p.numel() for p in ours.parameters()), "batch": batch, "prompt": prompt_len,
           "new_tokens": new, "threads": torch.get_num_threads(), "compile": compile}
    for name, runs in times.items():
        ttft = [t for t, _, _ in runs if t is not None]
        row[name] = {"ttft_ms": round(statistics.median(t[0] for t in ttft) * 1000, 1) if ttft else None,
                     "ttft_cpu_ms": round(statistics.median(t[1] for t in ttft) * 1000, 1) if ttft else None,
                     "decode_tok_s": round(batch * (new - 1) / statistics.median(w for _, w, _ in runs), 1),
                     "decode_cpu_tok_s": round(batch * (new - 1) / statistics.median(c for _, _, c in runs), 1)}
    if compile:
        row["compile_s"] = round(warmup["mm_llama"], 1)
    row["same_tokens"] = tokens["mm_llama"] == tokens["transformers"]
    key = "decode_tok_s" if device.startswith("cuda") else "decode_cpu_tok_s"
    row["decode_speedup"] = round(row["mm_llama"][key] / row["transformers"][key], 2)
    if row["transformers"]["ttft_ms"] is not None:
        ttft_key = "ttft_ms" if device.startswith("cuda") else "ttft_cpu_ms"
        row["ttft_speedup"] = round(row["transformers"][ttft_key] / row["mm_llama"][ttft_key], 2)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["30m", "300m"], choices=list(SIZES))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations (default float32)")
    p.add_argument("--compile", action="store_true", help="decode with mm_llama's torch.compile'd step")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if args.new < 2:
        p.error("--new must be at least 2 (decode speed counts the tokens after the first)")
    _common.set_threads(args.threads)
    print(json.dumps({"machine": _common.machine(), "loadavg": Path("/proc/loadavg").read_text().split()[:3]
                      if Path("/proc/loadavg").exists() else None}), flush=True)
    for size in args.sizes:
        for batch in args.batch:
            row = measure(size, args.prompt, args.new, batch, args.repeats, args.device, DTYPES[args.dtype],
                          args.compile)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""Single-GPU training throughput and MFU of the engine's text step, eager and compiled, beside `transformers`.

The step is what `mm_llama.train.engine` runs on one GPU: fp32 master weights, bf16 autocast, summed
next-token cross-entropy over labelled tokens divided by their count, backward, clipping, fused AdamW.
The baseline is `transformers.LlamaForCausalLM` with the same config and weights in the same loop
(same autocast, clipping and fused AdamW), measured in the same process. The sides run one after the
other (not interleaved) so that only one 1B-scale model with its optimizer state is on the card at a time.

MFU = model FLOPs/s over two peaks: the bf16 matrix-multiply rate measured in this run (an 8192³ product,
the practical ceiling) and the card's datasheet dense bf16 rate where the card is known. Model FLOPs are
counted as in `bench/train_text.py` (matmuls of the non-embedding weights, the output projection and
causal attention, forward ×3).

    python bench/train_gpu.py [--config configs/models/llama3_2_1b.yaml] [--batch 4] [--seq 2048]
                              [--steps 10] [--no-baseline] [--no-compile] [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from functools import partial
from pathlib import Path

from _common import machine, markdown_table

import torch  # noqa: E402

from mm_llama.checkpoint.hf import hf_config_from_args, to_hf_state_dict  # noqa: E402
from mm_llama.config import ModelConfig, load_config  # noqa: E402
from mm_llama.model import Transformer, init_weights  # noqa: E402
from mm_llama.train.losses import IGNORE, compiled_lm_loss_sum, lm_loss_sum  # noqa: E402
from train_text import model_flops_per_token  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Datasheet dense bf16 tensor-core rates (TFLOP/s, without sparsity), by device-name substring.
DATASHEET_BF16 = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                  "H200": 989.4, "A100": 312.0}


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_time(fn, device: torch.device, steps: int, warmup: int) -> list[float]:
    """Seconds per call of `fn`, one synchronised wall-clock reading per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_peak_tflops(device: torch.device, n: int, repeats: int = 10) -> float:
    """Measured bf16 rate of an n×n×n product on random data (median of `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = statistics.median(device_time(lambda: torch.mm(a, b), device, repeats, 3))
    return 2 * n**3 / t / 1e12


def random_batch(vocab: int, batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens `[batch, seq]` and next-token labels with the last position ignored."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE)], dim=1)
    return tokens.to(device), labels.to(device)


def our_step_fn(model, tokens, labels, compiled: bool = False):
    device = tokens.device.type
    n_labels = int((labels != IGNORE).sum())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    loss_sum = compiled_lm_loss_sum() if compiled else lm_loss_sum  # as `train.compile`

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_sum(model(tokens), labels)
        (loss / n_labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach() / n_labels

    return step


def their_step_fn(model, tokens, labels):
    device = tokens.device.type
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            # transformers shifts itself: hand it the unshifted tokens with the same ignored last position
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(name: str, build, tokens, labels, make_step, steps: int, warmup: int) -> dict:
    device = tokens.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build()
    step = make_step(model, tokens, labels)
    t0 = time.perf_counter()
    try:
        first = float(step())
        first_s = time.perf_counter() - t0
        times = device_time(step, device, steps, warmup)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        row = {"name": name, "first_loss": first, "first_step_s": first_s, "step_s": statistics.median(times),
               "peak_gib": peak}
    except torch.OutOfMemoryError:  # a batch too large for the card is a row of the report, not the end of it
        row = {"name": name, "oom": True}
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/models/llama3_2_1b.yaml"))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-baseline", action="store_true", help="skip the transformers side")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled side")
    p.add_argument("--no-eager", action="store_true", help="skip our eager side")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--device", default="cuda", help="`cpu` only to smoke-test this script on a tiny config")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/train_gpu.py needs a CUDA GPU (bench/train_text.py is the CPU benchmark)")

    args = load_config(ModelConfig, a.config).lm
    tokens, labels = random_batch(args.vocab_size, a.batch, a.seq, device)
    cpu_init = init_weights(Transformer(args), torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in cpu_init.state_dict().items()}
    n_params = sum(p.numel() for p in cpu_init.parameters())
    del cpu_init

    def build_ours(compiled: bool):
        def build():
            with device:
                model = Transformer(args)
            model.load_state_dict(state)
            model.train()
            if compiled:  # what `train.compile` does: each block, and the loss (`our_step_fn`)
                for block in model.layers:
                    block.compile()
            return model
        return build

    def build_theirs():
        import transformers

        cfg = transformers.LlamaConfig(**hf_config_from_args(args))
        cfg._attn_implementation = "sdpa"
        with device:
            model = transformers.LlamaForCausalLM(cfg)
        missing, unexpected = model.load_state_dict(to_hf_state_dict(state, args), strict=False)
        if unexpected or set(missing) - ({"lm_head.weight"} if args.tie_embeddings else set()):
            raise SystemExit(f"transformers weights do not match: missing {missing}, unexpected {unexpected}")
        if args.tie_embeddings:  # the tied head is one tensor with the embedding, not a saved key
            model.lm_head.weight = model.model.embed_tokens.weight
        return model.train()

    rows = []
    if not a.no_eager:
        rows.append(measure("ours (eager)", build_ours(False), tokens, labels, our_step_fn, a.steps, a.warmup))
    if not a.no_compile:
        rows.append(measure("ours (torch.compile: blocks + loss)", build_ours(True), tokens, labels,
                            partial(our_step_fn, compiled=True), a.steps, a.warmup))
    if not a.no_baseline:
        rows.append(measure("transformers (eager, sdpa)", build_theirs, tokens, labels, their_step_fn,
                            a.steps, a.warmup))

    first = [r["first_loss"] for r in rows if not r.get("oom")]
    if first and max(first) - min(first) > 0.05:
        raise SystemExit(f"the first losses differ beyond bf16 rounding: {[r['first_loss'] for r in rows]}")
    peak = matmul_peak_tflops(device, 8192 if device.type == "cuda" else 512)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke test)"
    sheet = datasheet_peak(name)
    flops = model_flops_per_token(args, a.seq)
    n_tokens = a.batch * a.seq
    base = next((r for r in rows if r["name"].startswith("transformers")), None)
    table = []
    if base and base.get("oom"):
        base = None
    for r in rows:
        if r.get("oom"):
            table.append([r["name"], "out of memory", *["–"] * 8])
            continue
        tps = n_tokens / r["step_s"]
        tf = tps * flops / 1e12
        table.append([r["name"], f"{r['first_loss']:.4f}", f"{r['step_s'] * 1e3:.0f}", f"{tps:,.0f}",
                      f"{tf:.0f}", f"{tf / peak:.0%}", f"{tf / sheet:.0%}" if sheet else "n/a",
                      f"{base['step_s'] / r['step_s']:.2f}×" if base else "n/a",
                      f"{r['peak_gib']:.1f}", f"{r['first_step_s']:.0f}"])
    info = machine()
    report = "\n".join([
        f"`bench/train_gpu.py` — {info['date']}, {name}, torch {info['torch']}, commit {info['commit']}; "
        f"{Path(a.config).name} ({n_params / 1e9:.2f}B parameters), batch {a.batch} × seq {a.seq} "
        f"({n_tokens:,} tokens/step), fp32 weights + bf16 autocast, fused AdamW; median of {a.steps} steps "
        f"after {a.warmup} warm-up.",
        "",
        markdown_table(["training step", "first loss", "ms/step", "tokens/s", "model TFLOP/s",
                        "MFU (measured peak)", "MFU (datasheet)", "vs transformers", "peak GiB",
                        "first step s"], table),
        "",
        f"- bf16 matmul peak measured in this run (8192³, random data): {peak:.0f} TFLOP/s; datasheet dense "
        f"bf16: {sheet or 'unknown'} TFLOP/s.",
        f"- model FLOPs per token (fwd+bwd): {flops / 1e9:.2f} GFLOP.",
    ])
    print(report)
    if a.markdown:
        a.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()

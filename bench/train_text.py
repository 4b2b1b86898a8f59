"""Training throughput of the engine's text step against a plain `transformers` training loop, with MFU.

One process, same thread count, same config, weights and batch on both sides:
- **ours**: the engine's step for objective `lm` — the task's summed loss over labelled tokens divided by their
  count, backward, gradient clipping, fused AdamW (what `mm_llama.train.engine` runs);
- **transformers**: `LlamaForCausalLM(input_ids, labels=...)`, backward, clipping, `torch.optim.AdamW` defaults.
Steps are timed interleaved (ours, theirs, ours, …); tokens/s is batch × seq / median step time.

MFU = model FLOPs/s ÷ this machine's fp32 matrix-multiply peak, measured in the same run (the fastest of
square matmuls and the model's own GEMM shapes). Model FLOPs are counted honestly: 2 per multiply-add of every non-embedding matrix and the output
projection per token, plus attention scores and values (2·2·T·d per token per layer, halved for the causal mask),
forward ×3 for forward + backward.

The data pipeline (`TextLoader` on the demo text with the demo tokenizer, same seq and batch) is timed alone and
compared with the trainer's tokens/s: it must not be what limits training.

    python bench/train_text.py [--config configs/models/bench_30m.yaml] [--threads 2] [--batch 4] [--seq 512]
                               [--repeats 5] [--compile] [--data DIR] [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import machine, markdown_table, set_threads, time_interleaved  # first: sets OMP_WAIT_POLICY

import torch  # noqa: E402
import transformers  # noqa: E402

from mm_llama.checkpoint.hf import hf_config_from_args, to_hf_state_dict  # noqa: E402
from mm_llama.config import ModelConfig, load_config  # noqa: E402
from mm_llama.data import Batch, DataConfig, SourceConfig, TextLoader  # noqa: E402
from mm_llama.model import Transformer, init_weights  # noqa: E402
from mm_llama.train.losses import IGNORE, compiled_lm_loss_sum, lm_loss_sum  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def model_flops_per_token(args, seq: int) -> float:
    """Forward + backward FLOPs per trained token (matmuls only; see the module docstring)."""
    per_layer = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.kv_heads) + 3 * args.dim * args.hidden_dim
    matmul_params = args.n_layers * per_layer + args.dim * args.vocab_size  # blocks + output projection
    attention = args.n_layers * 2 * 2 * seq * args.dim / 2  # QKᵀ and AV, causal half
    return 3 * (2 * matmul_params + attention)


def matmul_peak(shapes: list[tuple[int, int, int]], repeats: int) -> tuple[float, tuple[int, int, int]]:
    """The best fp32 GFLOP/s over matmuls of shapes (m, k, n): this machine's practical peak at this thread count.

    Square matmuls alone under-state it (one 2048² square ran slower than the model's own GEMMs), so the
    model's GEMM shapes are among the candidates and the fastest counts."""
    best = (0.0, shapes[0])
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        timings = time_interleaved({"mm": lambda: torch.mm(a, b)}, repeats=repeats, warmup=2)["mm"]
        best = max(best, (2 * m * k * n / min(timings.wall) / 1e9, (m, k, n)))
    return best


def build(config: Path, seed: int, compile_ours: bool):
    args = load_config(ModelConfig, config).lm
    ours = init_weights(Transformer(args), torch.Generator().manual_seed(seed)).train()
    hf_config = transformers.LlamaConfig(**hf_config_from_args(args))
    hf_config._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(hf_config).train()
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=True)
    if compile_ours:  # what `train.compile` does: each block, and the loss (`make_steps`)
        for block in ours.layers:
            block.compile()
    return args, ours, theirs


def make_steps(ours, theirs, batch: Batch, document_mask: bool = False, compiled: bool = False):
    """Zero-argument optimizer steps returning the loss: the engine's, and the plain transformers loop's.

    `transformers` has no document mask, so the compared step runs ours with the plain causal mask over the
    same packed rows (identical computation); `document_mask=True` gives the engine's real step."""
    our_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    their_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    # transformers shifts labels itself and cannot score the last position: leave it out on both sides
    labels = batch.labels.clone()
    labels[:, -1] = IGNORE
    labels_hf = torch.cat([batch.tokens[:, :1], labels[:, :-1]], dim=1)
    n_labels = int((labels != IGNORE).sum())

    doc_ids = batch.doc_ids if document_mask else None

    loss_sum = compiled_lm_loss_sum() if compiled else lm_loss_sum  # as `train.compile`

    def our_step():
        logits = ours(batch.tokens, doc_ids=doc_ids)
        loss = loss_sum(logits, labels)
        (loss / n_labels).backward()
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        our_opt.step()
        our_opt.zero_grad(set_to_none=True)
        return float(loss.detach()) / n_labels

    def their_step():
        out = theirs(input_ids=batch.tokens, labels=labels_hf)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return our_step, their_step


def demo_batches(data: Path | None, seq: int, batch: int, n: int) -> tuple[list[Batch], float, Path]:
    """`n` batches from the demo text through the real pipeline, and the pipeline's tokens/s producing them."""
    if data is None:
        from mm_llama.data.demo import write_demo

        data = Path(tempfile.mkdtemp(prefix="bench-demo-"))
        write_demo(data, ["text"])
    from mm_llama.text import load_tokenizer

    cfg = DataConfig(root=str(data), sources=[SourceConfig(name="demo", shards="text/train-*.tar")])
    loader = iter(TextLoader(cfg, load_tokenizer(data), seq_len=seq, batch_size=batch, seed=0))
    next(loader)  # start-up (shard listing, first shard open) is not throughput
    t0 = time.perf_counter()
    batches = [next(loader) for _ in range(n)]
    return batches, n * batch * seq / (time.perf_counter() - t0), data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/models/bench_30m.yaml"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="compile our blocks and loss (compile time excluded)")
    p.add_argument("--data", type=Path, help="a `mm-llama data demo` folder (default: written to a temp dir)")
    p.add_argument("--markdown", type=Path, help="also write the result table here")
    a = p.parse_args()
    set_threads(a.threads)

    batches, pipeline_tps, _ = demo_batches(a.data, a.seq, a.batch, 20)
    args, ours, theirs = build(Path(a.config), 0, a.compile)
    our_step, their_step = make_steps(ours, theirs, batches[0], compiled=a.compile)
    first_ours, first_theirs = our_step(), their_step()  # same weights, same batch: the losses must agree
    if abs(first_ours - first_theirs) > 1e-4:
        raise SystemExit(f"losses differ before timing: ours {first_ours:.6f} vs transformers {first_theirs:.6f}")
    doc_step, _ = make_steps(ours, theirs, batches[0], document_mask=True, compiled=a.compile)
    tokens_per_batch = a.batch * a.seq
    peak, peak_shape = matmul_peak([(1024, 1024, 1024), (2048, 2048, 2048), (3072, 3072, 3072),
                                    (tokens_per_batch, args.dim, args.hidden_dim),
                                    (tokens_per_batch, args.hidden_dim, args.dim),
                                    (tokens_per_batch, args.dim, args.vocab_size)], a.repeats)
    timings = time_interleaved({"ours": our_step, "transformers": their_step, "ours, document mask": doc_step},
                               repeats=a.repeats, warmup=1)
    tokens = a.batch * a.seq
    flops = model_flops_per_token(args, a.seq)
    n_params = sum(p.numel() for p in ours.parameters())
    rows = []
    for name, t in timings.items():
        tps = tokens / t.wall_median
        rows.append([name, f"{t.wall_median * 1e3:.0f}", f"{tps:,.0f}", f"{tps * flops / 1e9:.1f}",
                     f"{tps * flops / 1e9 / peak:.0%}"])
    ratio = timings["transformers"].wall_median / timings["ours"].wall_median
    cpu_ratio = timings["transformers"].cpu_median / timings["ours"].cpu_median
    ours_tps = tokens / timings["ours"].wall_median
    info = machine()
    table = markdown_table(["training step", "ms/step (median)", "tokens/s", "model GFLOP/s", "MFU"], rows)
    report = "\n".join([
        f"`bench/train_text.py` — {info['date']}, {info['cpu']}, {info['threads']} threads, torch {info['torch']}, "
        f"commit {info['commit']}; {Path(a.config).name} ({n_params / 1e6:.1f}M parameters), batch {a.batch} × "
        f"seq {a.seq}, {a.repeats} interleaved repeats{', ours compiled' if a.compile else ''}.",
        "",
        table,
        "",
        f"- ours / transformers tokens/s: **{ratio:.2f}×** (CPU-time ratio {cpu_ratio:.2f}×); target ≥ 1.2×",
        f"- fp32 matmul peak measured in this run: {peak:.1f} GFLOP/s (best of square and model-shaped GEMMs: "
        f"{'×'.join(map(str, peak_shape))}); "
        f"our MFU {ours_tps * flops / 1e9 / peak:.0%}; target ≥ 65%",
        f"- data pipeline alone: {pipeline_tps:,.0f} tokens/s = **{pipeline_tps / ours_tps:.0f}×** the trainer's "
        "tokens/s; target ≥ 20×",
    ])
    print(report)
    if a.markdown:
        a.markdown.write_text(report + "\n")


if __name__ == "__main__":
    main()

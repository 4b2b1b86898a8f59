"""One training step of our Llama 3 LM against `transformers.LlamaForCausalLM`, same config and weights.

Both sides compute fp32 logits and the mean next-token cross-entropy, then backward, with the same
thread count, timed interleaved (ours, theirs, ours, …) in one process. The figure is the ratio of the
medians (ours / theirs, lower is faster); wall clock is the headline, and the ratio of CPU time, which
the other jobs on a shared machine disturb less, is printed beside it. Before timing, the two losses
must agree to 1e-4 and the embedding and output-projection gradients to 1e-4 of their scale, so both
really compute the same thing. `--compile` adds `torch.compile` of our model as an extra column
(compilation excluded from the timings and reported separately).

    python bench/lm_step.py [--config configs/models/bench_30m.yaml] [--threads 1] [--batch 4] [--seq 512]
                            [--repeats 5] [--compile] [--markdown OUT.md]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from _common import machine, markdown_table, set_threads, time_interleaved  # first: sets OMP_WAIT_POLICY

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

from mm_llama.checkpoint.hf import hf_config_from_args, to_hf_state_dict  # noqa: E402
from mm_llama.config import ModelConfig, load_config  # noqa: E402
from mm_llama.model import Transformer, init_weights  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100
LOSS_TOL = 1e-4
GRAD_TOL = 1e-4


def build(config: Path, seed: int):
    """(args, ours, theirs): our model with the project's init, and `transformers`' with the same weights."""
    args = load_config(ModelConfig, config).lm
    ours = init_weights(Transformer(args), torch.Generator().manual_seed(seed)).train()
    hf_config = transformers.LlamaConfig(**hf_config_from_args(args))
    hf_config._attn_implementation = "sdpa"  # its fastest CPU attention: the same SDPA kernel as ours
    theirs = transformers.LlamaForCausalLM(hf_config).train()
    theirs.load_state_dict(to_hf_state_dict(ours.state_dict(), args), strict=True)
    return args, ours, theirs


def step_fns(ours, theirs, tokens):
    """Zero-argument steps (zero grads, forward, loss, backward) returning the loss; ours uses next-token labels
    with the last position ignored, exactly what `transformers` builds from `labels=tokens`."""
    labels = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], IGNORE)], dim=1)

    def our_step(model=ours):
        model.zero_grad(set_to_none=True)
        logits = model(tokens)  # [batch, seq, vocab] fp32
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        loss.backward()
        return loss.detach()

    def their_step():
        theirs.zero_grad(set_to_none=True)
        loss = theirs(input_ids=tokens, labels=tokens).loss
        loss.backward()
        return loss.detach()

    return our_step, their_step


def check_same(name: str, ours, our_loss, theirs, their_loss) -> tuple[float, float]:
    """Exit unless losses agree to LOSS_TOL and the unpermuted gradients to GRAD_TOL of their largest entry;
    returns (loss difference, largest relative gradient difference)."""
    loss_err = abs(our_loss.item() - their_loss.item())
    if loss_err > LOSS_TOL:
        raise SystemExit(f"{name}: loss {our_loss.item():.6f} differs from transformers' {their_loss.item():.6f}")
    pairs = {
        "tok_embeddings": (ours.tok_embeddings.weight.grad, theirs.model.embed_tokens.weight.grad),
        "output": (ours.output.weight.grad, theirs.lm_head.weight.grad),
    }
    grad_err = 0.0
    for key, (a, b) in pairs.items():
        err = ((a - b).abs().max() / b.abs().max()).item()
        if err > GRAD_TOL:
            raise SystemExit(f"{name}: {key} gradient differs from transformers' by {err:.2e} of its scale")
        grad_err = max(grad_err, err)
    return loss_err, grad_err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/models/bench_30m.yaml", help="model config YAML")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads, for both sides")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side, interleaved")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="add torch.compile of our model as an extra column")
    p.add_argument("--markdown", type=Path, help="also write the result as a Markdown section to this file")
    a = p.parse_args(argv)
    if a.batch < 1 or a.seq < 2:
        p.error("--batch must be at least 1 and --seq at least 2 (one next-token label)")

    set_threads(a.threads)
    args, ours, theirs = build(a.config, a.seed)
    if a.seq > args.max_seq_len:
        p.error(f"--seq {a.seq} exceeds max_seq_len {args.max_seq_len} of {a.config}")
    tokens = torch.randint(0, args.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(a.seed + 1))
    our_step, their_step = step_fns(ours, theirs, tokens)
    their_loss = their_step()
    loss_err, grad_err = check_same("ours", ours, our_step(), theirs, their_loss)
    fns = {"ours (eager)": our_step, "transformers (eager, sdpa)": their_step}

    compile_s = None
    if a.compile:
        compiled = torch.compile(copy.deepcopy(ours))
        t0 = time.perf_counter()
        compiled_loss = our_step(compiled)  # the first step compiles forward and backward
        compile_s = time.perf_counter() - t0
        check_same("ours (compiled)", compiled, compiled_loss, theirs, their_step())
        fns["ours (torch.compile)"] = lambda: our_step(compiled)

    times = time_interleaved(fns, a.repeats, a.warmup)
    ref = times["transformers (eager, sdpa)"]
    n_params = sum(p.numel() for p in ours.parameters())
    header = ["model", "median wall s", "median CPU s", "tokens/s (wall)", "ratio to transformers (wall)", "ratio (CPU)"]
    rows = [
        [
            name,
            f"{t.wall_median:.3f}",
            f"{t.cpu_median:.3f}",
            f"{a.batch * a.seq / t.wall_median:,.0f}",
            f"{t.wall_median / ref.wall_median:.3f}",
            f"{t.cpu_median / ref.cpu_median:.3f}",
        ]
        for name, t in times.items()
    ]
    table = markdown_table(header, rows)
    info = machine()
    shown = [arg for arg in (sys.argv[1:] if argv is None else argv) if not arg.startswith("--markdown")]
    if a.markdown and str(a.markdown) in shown:  # the output path is the writer's business, not the figure's
        shown.remove(str(a.markdown))
    cmd = "python bench/lm_step.py " + " ".join(shown)
    lines = [
        "## Language-model training step against transformers (`bench/lm_step.py`)",
        "",
        f"- Date: {info['date']}. Machine: {info['cores']} CPU `{info['cpu']}` (lscpu); {info['threads']} torch "
        f"thread(s), OMP_WAIT_POLICY={info['omp_wait_policy']}. Commit: {info['commit']}. torch {info['torch']}, "
        f"transformers {transformers.__version__}.",
        f"- Command: `{cmd.strip()}`. Model: `{a.config.name}` ({n_params / 1e6:.1f}M parameters), batch {a.batch} × "
        f"sequence {a.seq}, fp32; forward + mean next-token cross-entropy + backward; {a.repeats} interleaved steps "
        f"per side after {a.warmup} warm-up; medians.",
        f"- Same weights (Meta → Hugging Face rotary permutation): losses agree to {LOSS_TOL:g} "
        f"(here {their_loss.item():.6f}, difference {loss_err:.1e}), embedding and output gradients to {GRAD_TOL:g} "
        f"of their scale (here {grad_err:.1e}).",
    ]
    if compile_s is not None:
        lines.append(f"- torch.compile column: compilation ({compile_s:.0f} s for the first step) not timed.")
    lines += ["", table, ""]
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        a.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

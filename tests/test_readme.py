"""Every command block of the README runs, at tiny size, so the README cannot rot.

Each line of a ```bash block (and each ```python block) is matched by exactly one rule below. A rule either
rewrites the line to tiny size (two training steps, a smaller vocabulary, two processes instead of eight, a
free port) and runs it in a scratch folder, in README order so later lines find what earlier ones wrote, or
names the test that already runs it (the `make` targets). A README line that no rule matches fails the test:
a new command in the README needs a rule here.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from mm_llama.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TINY_STEPS = ["train.steps=2", "train.eval_every=0", "train.eval_batches=1", "run.checkpoint_every=2"]
# Stages of the demo pipeline the later README lines need (eval, chat, serve, rejection sampling).
PIPELINE_STAGES = ["text_pretrain", "long_context", "anneal", "image_encoder_pretrain", "sft", "reward_model"]


def readme_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), flags=re.S)


def bash_lines(body: str) -> list[str]:
    """Logical lines of a bash block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", body)
    lines = [re.sub(r"(^|\s)#.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line]


def readme_commands() -> list[str]:
    return [cmd for lang, body in readme_blocks() if lang == "bash" for line in bash_lines(body)
            for cmd in line.split(" && ")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(argv: list[str], stdin: str = "") -> str:
    """Run `mm-llama ARGV` in this process; returns stdout; fails on a non-zero exit."""
    out = io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's --help
                code = e.code or 0
    finally:
        sys.stdin = old_stdin
    assert code == 0, f"mm-llama {shlex.join(argv)} exited {code}\n{out.getvalue()[-2000:]}"
    return out.getvalue()


def tiny(argv: list[str]) -> list[str]:
    """The same command at tiny size: two steps, a 600-rank tokenizer, the pipeline's first stages only."""
    sub = {r"train\.steps=\d+": "train.steps=2", r"^32000$": "600", r"model\.lm\.vocab_size=\d+": "model.lm.vocab_size=856"}
    for pattern, repl in sub.items():
        argv = [re.sub(pattern, repl, a) for a in argv]
    if argv[0] in ("train", "pipeline"):
        argv = [a for a in argv if not a.startswith("train.steps=")] + TINY_STEPS
    return argv


def without_optional(argv: list[str]) -> list[str]:
    """Drop `[...]` groups, the README's notation for optional arguments."""
    text = re.sub(r"\s*\[[^\]]*\]", "", shlex.join(argv).replace("'", ""))
    return shlex.split(text)


def serve_and_ask(argv: list[str]) -> None:
    """`mm-llama serve …` on a free port: /health answers, /v1/models lists the model, then it is stopped."""
    port = free_port()
    argv = list(argv)
    i = argv.index("--port")
    argv[i + 1] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "mm_llama", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "the server did not answer /health within 120 s"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"], "no model listed"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def prepare_inputs(demo: Path) -> None:
    """What the README assumes the user has: text folders, a JSONL file, raw shards to curate."""
    texts = []
    for shard in sorted((demo / "text").glob("train-*.tar"))[:2]:
        with tarfile.open(shard) as tar:
            texts += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    for folder in ("my_texts", "corpus"):
        Path(folder).mkdir()
        for i, text in enumerate(texts[:200]):
            Path(folder, f"doc{i:03d}.txt").write_text(text)
    Path("more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[200:260]))
    Path("raw").mkdir()
    for shard in sorted((demo / "text").glob("train-*.tar"))[:2]:
        Path("raw", shard.name).write_bytes(shard.read_bytes())
    prepare_media()


def prepare_media() -> None:
    """A few pictures, two videos as frame folders, two audio clips (with their TSV files) and two
    interleaved documents."""
    import numpy as np
    import soundfile
    from PIL import Image

    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    Path("photos").mkdir()
    rows = ["image\tcaption\tquestion\tanswer\ttype"]
    for i, (name, rgb) in enumerate(list(colours.items()) * 3):
        Image.new("RGB", (64, 48), rgb).save(f"photos/p{i}.png")
        rows.append(f"p{i}.png\ta {name} picture\tWhat colour is it?\t{name}\tcolour")
    Path("photos.tsv").write_text("\n".join(rows) + "\n")
    Path("clips").mkdir()
    rows = ["video\tcaption"]
    for v, (name, rgb) in enumerate(colours.items()):
        Path("clips", f"v{v}").mkdir()
        for f in range(4):
            img = Image.new("RGB", (48, 48), (0, 0, 0))
            img.paste(rgb, (4 + 8 * f, 16, 16 + 8 * f, 28))
            img.save(f"clips/v{v}/{f:03d}.jpg")
        rows.append(f"v{v}\ta {name} square moves right")
    Path("clips.tsv").write_text("\n".join(rows) + "\n")
    Path("audio").mkdir()
    rows = ["audio\ttranscript"]
    for i in range(2):
        t = np.arange(16000) / 16000
        soundfile.write(f"audio/a{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t)).astype(np.float32), 16000)
        rows.append(f"a{i}.wav\ta tone number {i}")
    Path("audio.tsv").write_text("\n".join(rows) + "\n")
    Path("docs").mkdir()  # interleaved documents: Markdown with picture links, and OBELICS-style JSONL
    Path("docs/colours.md").write_text("Two colours.\n\n![red](../photos/p0.png)\n\nThen blue.\n\n![](../photos/p1.png)\n")
    Path("pages.jsonl").write_text(json.dumps({"texts": ["A green page.", None], "images": [None, "photos/p2.png"]}) + "\n")


# The README's IsoFLOPs grid made a hundred times cheaper: two budgets × three widths, a few steps each.
TINY_SWEEP = """
name: readme_isoflops
stage: tiny/text_pretrain.yaml
budgets: [2.0e9, 6.0e9]
overrides: [train.seq_len=64, train.micro_batch=4, train.eval_batches=1, train.eval_every=0, data.num_workers=0,
            run.log_every=100000, optim.lr=2.0e-3]
models:
  - {name: d32, overrides: [model.lm.dim=32, model.lm.n_heads=2, model.lm.n_kv_heads=1, model.lm.n_layers=1]}
  - {name: d48, overrides: [model.lm.dim=48, model.lm.n_heads=3, model.lm.n_kv_heads=1, model.lm.n_layers=1]}
  - {name: d64, overrides: [model.lm.dim=64, model.lm.n_heads=4, model.lm.n_kv_heads=2, model.lm.n_layers=1]}
min_steps: 3
"""


def run_line(cmd: str) -> None:
    """Run one README line at tiny size (see the module docstring)."""
    words = shlex.split(cmd)
    if words[0] == "make" and words[1:] in (["demo"], ["test"]):
        return  # `make test` is this suite; `make demo`'s pipeline runs in tests/test_demo_pipeline.py
    if words[0] == "torchrun":
        return  # the multi-process block: test_readme_multi_process_block (slow)
    assert words[0] == "mm-llama", f"README line with no rule in tests/test_readme.py: {cmd}"
    argv = tiny(words[1:])
    if argv[:2] == ["data", "demo"]:
        cli(argv)
        prepare_inputs(Path(argv[2]))
    elif argv[0] == "pipeline":
        argv = without_optional(argv)
        cli([*argv[:2], "--only", *PIPELINE_STAGES, *argv[2:]])
    elif argv[0] == "chat":
        out = cli([*argv, "--max-new-tokens", "4"], stdin="Hello\n/reset\n")
        assert "assistant>" in out
    elif argv[0] == "serve":
        serve_and_ask(argv)
    elif argv[:2] == ["scaling", "sweep"]:
        Path("readme_isoflops.yaml").write_text(TINY_SWEEP)
        cli([*argv[:2], "readme_isoflops.yaml", *argv[3:]])
    else:
        cli(argv)


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A user's folder: the repository's configs, nothing else."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def test_every_readme_line_has_a_rule():
    commands = readme_commands()
    assert len(commands) > 20 and any(c.startswith("make demo") for c in commands)
    for cmd in commands:
        first = shlex.split(cmd)[0]
        assert first in ("make", "mm-llama", "torchrun"), f"README line with no rule in tests/test_readme.py: {cmd}"


@pytest.mark.timeout(900)
def test_readme_commands_run_at_tiny_size(scratch):
    for cmd in readme_commands():
        start = time.perf_counter()
        try:
            run_line(cmd)
        except AssertionError as e:
            raise AssertionError(f"README line failed: {cmd}\n{e}") from None
        print(f"{time.perf_counter() - start:6.1f} s  {cmd}", file=sys.__stderr__)
    for lang, body in readme_blocks():
        if lang == "python":
            exec(compile(body, "README.md (python block)", "exec"), {})


@pytest.mark.slow
def test_readme_multi_process_block(scratch):
    """The torchrun lines on gloo: two processes instead of eight, the tiny stage instead of the real one."""
    from mm_llama.data.demo import write_demo

    write_demo(scratch / "data" / "demo", modalities=["text"])
    for cmd in readme_commands():
        words = shlex.split(cmd)
        if words[0] != "torchrun":
            continue
        if "--nnodes" in words:
            continue  # two nodes on loopback: tests/test_parallel_engine.py::test_two_nodes_over_loopback
        words = [re.sub(r"^(parallel\.tp)=\d+$", r"\1=2", w) for w in words]
        words = ["2" if prev == "--nproc_per_node" else w for prev, w in zip([""] + words, words)]
        words = ["configs/stages/tiny/text_pretrain.yaml" if w in ("CONFIG", "configs/stages/text_pretrain.yaml")
                 else w for w in words]
        parallel = [w for w in words if w.startswith("parallel.")]
        if any(w.startswith(("parallel.pp=", "parallel.cp=")) for w in parallel):  # 2 processes: one axis
            words = [w for w in words if not w.startswith("parallel.tp=")]
        words = [w if not w.startswith("parallel.pp_microbatches=") else "parallel.pp_microbatches=2" for w in words]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        argv = [*words, *TINY_STEPS, "run.device=cpu", "model.lm.n_layers=2", "train.micro_batch=2",
                f"run.out_dir={scratch / 'runs' / str(abs(hash(cmd)))}"]
        argv[0:1] = [sys.executable, "-m", "torch.distributed.run"]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README line failed: {cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"

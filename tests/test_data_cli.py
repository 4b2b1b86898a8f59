"""`mm-llama data demo`, `mm-llama data pack text` and the `data curate` dispatch, end to end."""
from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest
import torch

from mm_llama.cli import main
from mm_llama.data import DataConfig, TextLoader, heldout_batches
from mm_llama.data.pack import parse_size
from mm_llama.data.shards import read_shard
from mm_llama.text import load_tokenizer


def keys_and_texts(path) -> dict[str, str]:
    return {s["__key__"]: s["txt"].decode() for s in read_shard(str(path), pytest.fail)}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["data", "demo", str(out)]) == 0
    return out


def test_demo_writes_shards_split_tokenizer_and_readme(demo, capsys):
    train = sorted((demo / "text").glob("train-*.tar"))
    assert [p.name for p in train] == [f"train-{i:06d}.tar" for i in range(8)]
    train_docs = {k: v for p in train for k, v in keys_and_texts(p).items()}
    val_docs = keys_and_texts(demo / "text" / "val-000000.tar")
    assert len(train_docs) > 400 and len(val_docs) > 10
    assert not set(train_docs) & set(val_docs)
    assert sum(len(v) for v in train_docs.values()) > 300_000
    assert any(t.startswith("Module argparse") for t in [*train_docs.values(), *val_docs.values()])
    meta = json.loads(next(read_shard(str(train[0]), pytest.fail))["json"])
    assert meta["source"] and meta["domain"] in ("reference", "docstring")
    tok = load_tokenizer(demo / "tokenizer.model")
    assert tok.n_words >= 4096
    text = next(iter(val_docs.values()))
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text
    readme = (demo / "README.md").read_text()
    assert "text/train-{000000..000007}.tar" in readme and "`<key>.txt`" in readme


def test_demo_is_deterministic(demo, tmp_path):
    assert main(["data", "demo", str(tmp_path), "--modalities", "text"]) == 0
    for p in sorted((demo / "text").glob("*.tar")) + [demo / "tokenizer.model"]:
        again = tmp_path / p.relative_to(demo)
        assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(again.read_bytes()).digest(), p.name


def test_demo_feeds_two_ranks_with_two_workers_each(demo):
    tok = load_tokenizer(demo / "tokenizer.model")
    cfg = DataConfig(
        root=str(demo),
        sources=[{"name": "text", "shards": "text/train-{000000..000007}.tar"}],
        heldout=[{"name": "val", "shards": "text/val-000000.tar"}],
        num_workers=2,
    )
    for rank in range(2):
        loader = TextLoader(cfg, tok, seq_len=64, batch_size=2, seed=0, rank=rank, world_size=2)
        it = iter(loader)
        for _ in range(4):  # both workers deliver twice
            b = next(it)
            assert b.tokens.shape == (2, 64) and int(b.tokens.max()) < tok.n_words
        assert loader.stats()["skipped_samples"] == 0 and loader.stats()["documents"] >= 4
    held = heldout_batches(cfg, tok, seq_len=64, batch_size=4, max_batches=3)
    again = heldout_batches(cfg, tok, seq_len=64, batch_size=4, max_batches=3)
    assert len(held) == 3 and all(torch.equal(h.tokens, a.tokens) for h, a in zip(held, again))
    assert held[0].tokens[0, 0].item() == tok.bos_id


def test_demo_rejects_unknown_modalities(tmp_path, capsys):
    assert main(["data", "demo", str(tmp_path), "--modalities", "smell"]) == 1
    assert "unknown modalities ['smell']; available: text" in capsys.readouterr().err


def test_pack_text_folders_and_jsonl(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha document " * 40)
    (src / "b.md").write_text("# beta\n\nmarkdown body " * 40)
    (src / "sub" / "c.txt").write_text("gamma " * 60)
    (src / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (src / "empty.txt").write_text("  \n")
    (src / "notes.csv").write_text("ignored,1")
    lines = [
        json.dumps({"text": "json one " * 30, "url": "https://example.org/1", "date": "2024-01-01"}),
        "{broken json",
        json.dumps({"body": "no text field"}),
        json.dumps({"text": ""}),
        json.dumps({"text": "json two " * 30}),
    ]
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    code = main(["data", "pack", "text", "--input", str(src), str(tmp_path / "web.jsonl"), "--out", str(out), "--shard-size", "2KB", "--prefix", "mine"])
    captured = capsys.readouterr()
    assert code == 0
    assert "5 documents" in captured.out and "skipped 1 unreadable files, 4 records" in captured.out
    assert "bad.txt" in captured.err and "web.jsonl:2" in captured.err and "web.jsonl:3" in captured.err
    shards = sorted(out.glob("mine-*.tar"))
    assert len(shards) >= 2 and shards[0].name == "mine-000000.tar"
    samples = [s for p in shards for s in read_shard(str(p), pytest.fail)]
    texts = [s["txt"].decode() for s in samples]
    assert texts == ["alpha document " * 40, "# beta\n\nmarkdown body " * 40, "gamma " * 60, "json one " * 30, "json two " * 30]
    meta = json.loads(samples[3]["json"])
    assert meta == {"url": "https://example.org/1", "date": "2024-01-01", "source": f"{tmp_path / 'web.jsonl'}:1"}
    assert json.loads(samples[0]["json"])["source"] == str(src / "a.txt")


def test_pack_reports_bad_inputs(tmp_path, capsys):
    assert main(["data", "pack", "text", "--input", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 1
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    (tmp_path / "x.txt").write_text("x")
    assert main(["data", "pack", "text", "--input", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o"), "--shard-size", "lots"]) == 1
    assert "shard size 'lots'" in capsys.readouterr().err
    assert parse_size("64MB") == 64_000_000 and parse_size("1.5GiB") == 3 * 2**29 and parse_size(4096) == 4096


def test_curate_is_dispatched_when_built(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mm_llama.curate", None)
    monkeypatch.delitem(sys.modules, "mm_llama.curate.command", raising=False)
    assert main(["data", "curate", "--anything"]) == 2
    assert "not built yet" in capsys.readouterr().err

    calls = []
    fake = types.ModuleType("mm_llama.curate.command")
    fake.configure = lambda p: p.add_argument("--min-words", type=int)
    fake.run = lambda args: calls.append(args.min_words) or 0
    monkeypatch.setitem(sys.modules, "mm_llama.curate", types.ModuleType("mm_llama.curate"))
    monkeypatch.setitem(sys.modules, "mm_llama.curate.command", fake)
    assert main(["data", "curate", "--min-words", "7"]) == 0 and calls == [7]

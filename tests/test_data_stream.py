"""Packing, mixing, rank/worker sharding, corrupt data and the held-out batches of the text pipeline."""
from __future__ import annotations

import re
import time
from collections import Counter

import pytest
import torch

from mm_llama.data import DataConfig, DataError, TextLoader, heldout_batches
from mm_llama.data.accounting import Counters
from mm_llama.data.mixing import Mixture
from mm_llama.data.packing import Packer, rows_to_batch
from mm_llama.data.text_stream import SourceStream
from test_data_shards import ByteTokenizer, text_shards, write_shard

TOK = ByteTokenizer()
DOC = re.compile(r"(\w+) s(\d+) d(\d+)")


def token_streams(batches, workers: int = 1) -> list[list[int]]:
    """Each worker's continuous token stream: rows start T apart, so their inputs concatenate exactly."""
    streams = [[] for _ in range(workers)]
    for k, b in enumerate(batches):
        for row in b.tokens.tolist():
            streams[k % workers] += row
    return streams


def doc_ids_in(stream: list[int]) -> list[tuple[str, int, int]]:
    """(source, shard, doc) of every document that starts in the stream, in order."""
    # split at bos; the first and last pieces may be cut documents
    text = bytes(0 if t == TOK.bos_id else t for t in stream if t != TOK.eos_id).split(b"\x00")[1:-1]
    return [(m[1], int(m[2]), int(m[3])) for m in (DOC.match(t.decode()) for t in text) if m]


def config(tmp_path, sources, **kw) -> DataConfig:
    return DataConfig(root=str(tmp_path), sources=sources, **kw)


# -- packing --------------------------------------------------------------------------------------

A, B, C, D = [1, 10, 11, 12, 2], [1, 20, 2], [1, 30, 31, 32, 33, 34, 2], [1, 40, 2]


def docs_from(i: int = 0):
    for k, d in enumerate([A, B, C, D][i:], i):
        yield d, f"doc{k}"


def test_packing_rows_labels_and_doc_ids_exactly():
    packer = Packer(docs_from(), seq_len=4)
    rows, states = [], []
    for _ in range(4):
        rows.append(packer.row())
        states.append(packer.state())
    tokens, labels, doc_ids = rows_to_batch([r[0] for r in rows], [r[1] for r in rows])
    assert tokens.tolist() == [[1, 10, 11, 12], [2, 1, 20, 2], [1, 30, 31, 32], [33, 34, 2, 1]]
    assert labels.tolist() == [[10, 11, 12, 2], [-100, 20, 2, -100], [30, 31, 32, 33], [34, 2, -100, 40]]
    assert doc_ids.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]
    # the position is (document holding the next row's first token, offset): C is cut across rows 2 and 3
    assert states == [("doc0", 4), ("doc2", 0), ("doc2", 4), ("doc3", 1)]
    assert packer.new_documents == 4
    assert (labels != -100).float().mean().item() == pytest.approx(13 / 16)
    with pytest.raises(StopIteration):
        packer.row()


def test_packing_resumes_from_its_position_at_any_seq_len():
    resumed = Packer(docs_from(2), seq_len=4, offset=4)
    assert resumed.row() == ([33, 34, 2, 1, 40], [0, 0, 0, 1, 1]) and resumed.new_documents == 1
    longer = Packer(docs_from(2), seq_len=2, offset=4)
    assert [longer.row()[0] for _ in range(2)] == [[33, 34, 2], [2, 1, 40]]
    # resuming at a document's first token: that document was counted before the state was taken
    assert Packer(docs_from(2), seq_len=4, offset=0).new_documents == 0
    assert Packer(docs_from(2), seq_len=4).new_documents == 1
    with pytest.raises(ValueError, match="outside the resumed document"):
        Packer(docs_from(1), seq_len=4, offset=3)


def test_heldout_batches_are_exact_and_deterministic(tmp_path):
    write_shard(tmp_path / "val.tar", [{"__key__": "a", "txt": "ab"}, {"__key__": "b", "txt": b"\xff"}, {"__key__": "c", "txt": "c"}])
    cfg = config(tmp_path, [{"name": "t", "shards": "val.tar"}], heldout=[{"name": "v", "shards": "val.tar"}])
    (batch,) = heldout_batches(cfg, TOK, seq_len=3, batch_size=2, max_batches=5)
    assert batch.tokens.tolist() == [[256, 97, 98], [257, 256, 99]]
    assert batch.labels.tolist() == [[97, 98, 257], [-100, 99, 257]]
    assert batch.doc_ids.tolist() == [[0, 0, 0], [0, 1, 1]]
    text_shards(tmp_path / "v", "v", 2, 20)
    cfg = config(tmp_path, [{"name": "t", "shards": "val.tar"}], heldout=[{"name": "v", "shards": "v/v-*.tar"}])
    first, second = (heldout_batches(cfg, TOK, 16, 4, 3) for _ in range(2))
    assert len(first) == 3 and all(torch.equal(a.tokens, b.tokens) for a, b in zip(first, second))
    assert heldout_batches(config(tmp_path, [{"name": "t", "shards": "val.tar"}]), TOK, 16, 4, 3) == []
    with pytest.raises(DataError, match=r"held-out sources v: not one row of 1001 tokens \(0 shards and 0 samples"):
        heldout_batches(cfg, TOK, 1000, 4, 3)


# -- mixing ---------------------------------------------------------------------------------------


def test_mixture_matches_weights_and_is_deterministic():
    weights = [0.5, 0.25, 0.17, 0.08]
    mix = Mixture([w * 3 for w in weights], seed=7, consumer=0)  # weights are normalised
    draws = [mix.choose(n) for n in range(40_000)]
    counts = Counter(draws)
    for i, w in enumerate(weights):
        assert counts[i] / len(draws) == pytest.approx(w, abs=0.01)
    assert draws == [Mixture(weights, seed=7, consumer=0).choose(n) for n in range(40_000)]
    assert draws[:200] != [Mixture(weights, seed=8, consumer=0).choose(n) for n in range(200)]
    assert draws[:200] != [Mixture(weights, seed=7, consumer=1).choose(n) for n in range(200)]


def test_loader_mixes_sources_by_weight(tmp_path):
    names = {"general": 0.5, "math": 0.25, "code": 0.17, "multi": 0.08}
    for name in names:
        text_shards(tmp_path / name, name, 2, 30, words=1)
    sources = [{"name": n, "shards": f"{n}/{n}-*.tar", "weight": w} for n, w in names.items()]
    loader = TextLoader(config(tmp_path, sources), TOK, seq_len=128, batch_size=8, seed=3)
    it = iter(loader)
    batches = [next(it) for _ in range(40)]
    seen = Counter(src for src, _, _ in doc_ids_in(token_streams(batches)[0]))
    total = sum(seen.values())
    assert total > 1500
    for name, w in names.items():
        assert seen[name] / total == pytest.approx(w, abs=0.03)
    again = iter(TextLoader(config(tmp_path, sources), TOK, seq_len=128, batch_size=8, seed=3))
    assert all(torch.equal(next(again).tokens, b.tokens) for b in batches[:5])


# -- ranks and workers ----------------------------------------------------------------------------


def epoch_docs(tmp_path, n_shards, per_shard, consumers, shuffle=True) -> list[list[tuple]]:
    """The documents each consumer reads in epoch 0."""
    urls = [str(p) for p in text_shards(tmp_path, "e", n_shards, per_shard)]
    cfg = config(tmp_path, [{"name": "e", "shards": "e-*.tar"}], shuffle_buffer=7)
    out = []
    for c in range(consumers):
        stream = SourceStream(cfg.sources[0], urls, c, consumers, seed=1, shuffle=shuffle, buffer=7, counters=Counters())
        docs = []
        for text, (epoch, _, _) in stream.documents([0, 0, 0]):
            if epoch > 0:
                break
            docs.append(DOC.match(text).groups())
        out.append(docs)
    return out


@pytest.mark.parametrize("n_shards,consumers", [(8, 4), (1, 2), (3, 4), (5, 2)])
def test_consumers_split_an_epoch_disjointly_and_completely(tmp_path, n_shards, consumers):
    per = epoch_docs(tmp_path, n_shards, 12, consumers)
    everything = [d for docs in per for d in docs]
    assert len(everything) == len(set(everything)) == n_shards * 12
    assert all(per)  # every consumer has data
    if n_shards >= consumers:  # whole shards per consumer
        shards = [{s for _, s, _ in docs} for docs in per]
        assert sum(len(s) for s in shards) == n_shards
    else:  # every consumer reads every shard, every n-th sample
        assert all({s for _, s, _ in docs} == set(map(str, range(n_shards))) for docs in per)


def test_shuffle_changes_order_per_epoch_and_is_off_when_asked(tmp_path):
    urls = [str(p) for p in text_shards(tmp_path, "e", 4, 10)]
    cfg = config(tmp_path, [{"name": "e", "shards": "e-*.tar"}])
    stream = SourceStream(cfg.sources[0], urls, 0, 1, seed=1, shuffle=True, buffer=5, counters=Counters())
    orders = {}
    for text, (epoch, _, _) in stream.documents([0, 0, 0]):
        if epoch == 2:
            break
        orders.setdefault(epoch, []).append(text)
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    plain = SourceStream(cfg.sources[0], urls, 0, 1, seed=1, shuffle=False, buffer=5, counters=Counters())
    first = [t for t, _ in zip((t for t, _ in plain.documents([0, 0, 0])), range(40))]
    assert [DOC.match(t).group(2, 3) for t in first] == [(str(s), str(d)) for s in range(4) for d in range(10)]


@pytest.mark.parametrize("n_shards", [8, 1])
def test_ranks_get_disjoint_data_and_endless_batches(tmp_path, n_shards):
    text_shards(tmp_path, "r", n_shards, 160 // n_shards, words=1)
    cfg = config(tmp_path, [{"name": "r", "shards": "r-*.tar"}])
    seen = []
    for rank in range(2):
        it = iter(TextLoader(cfg, TOK, seq_len=64, batch_size=2, seed=0, rank=rank, world_size=2))
        batches = [next(it) for _ in range(6)]  # ~ 6 * 128 / 20 = 38 documents of the rank's 80 in epoch 0
        seen.append(set(doc_ids_in(token_streams(batches)[0])))
        assert len(seen[-1]) > 20
        for _ in range(60):  # far past the end of the rank's share: the stream never ends
            assert next(it).tokens.shape == (2, 64)
    assert not seen[0] & seen[1]


# -- corrupt data ---------------------------------------------------------------------------------


def corrupt_mix(tmp_path):
    good = text_shards(tmp_path / "good", "good", 2, 10)
    write_shard(
        tmp_path / "good" / "good-000002.tar",
        [
            {"__key__": "u", "txt": b"bad \xc3\x28 utf8"},
            {"__key__": "e", "txt": "   "},
            {"__key__": "m", "json": {"no": "text"}},
            {"__key__": "ok", "txt": "good s2 d0 w"},
        ],
    )
    data = good[0].read_bytes()
    (tmp_path / "good" / "good-000003.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "good" / "good-000004.tar").write_bytes(b"\x00garbage" * 300)
    return [{"name": "good", "shards": "good/good-*.tar"}]


def test_corrupt_data_is_skipped_and_counted_exactly(tmp_path):
    cfg = config(tmp_path, corrupt_mix(tmp_path))
    from mm_llama.data.shards import source_shards

    counters = Counters()
    stream = SourceStream(cfg.sources[0], source_shards(cfg.sources[0], cfg.root), 0, 1, 5, True, 4, counters)
    docs = []
    for text, (epoch, _, _) in stream.documents([0, 0, 0]):
        if epoch:
            break
        docs.append(DOC.match(text).groups())
    assert (counters.skipped_samples, counters.skipped_shards) == (3, 2)
    assert set(docs) == {("good", s, str(d)) for s in "01" for d in range(10)} | {("good", "2", "0")}
    assert len(docs) > 21  # the readable part of the truncated copy of shard 0 is used as well


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_goes_on_past_corrupt_shards(tmp_path, workers):
    cfg = config(tmp_path, corrupt_mix(tmp_path), num_workers=workers)
    loader = TextLoader(cfg, TOK, seq_len=64, batch_size=4, seed=0)
    it = iter(loader)
    for _ in range(30):
        next(it)
    stats = loader.stats()
    assert stats["skipped_samples"] >= 3 and stats["skipped_shards"] >= 2
    assert stats["tokens"] == 30 * 4 * 64 and stats["documents"] > 30
    assert 0.9 < stats["packing_efficiency"] < 1.0


@pytest.mark.parametrize("workers", [0, 2])
def test_a_source_with_no_readable_shard_is_an_error_naming_it(tmp_path, workers):
    text_shards(tmp_path, "fine", 2, 10)
    for i in range(3):
        (tmp_path / f"broken-{i}.tar").write_bytes(b"not a tar" * 100)
    sources = [{"name": "fine", "shards": "fine-*.tar"}, {"name": "broken", "shards": "broken-*.tar", "weight": 0.5}]
    it = iter(TextLoader(config(tmp_path, sources, num_workers=workers), TOK, seq_len=32, batch_size=2, seed=0))
    with pytest.raises(DataError, match="data source 'broken': none of its 3 shards"):
        for _ in range(50):
            next(it)


def test_missing_shards_fail_when_the_loader_is_built(tmp_path):
    from mm_llama.config import ConfigError

    with pytest.raises(ConfigError, match="'web'.*web-000.tar"):
        TextLoader(config(tmp_path, [{"name": "web", "shards": "web-000.tar"}]), TOK, 8, 2, seed=0)


def test_speed_of_the_pipeline(tmp_path):
    text_shards(tmp_path, "s", 4, 200, words=120)
    for workers in (0, 2):
        cfg = config(tmp_path, [{"name": "s", "shards": "s-*.tar"}], num_workers=workers, shuffle_buffer=100)
        it = iter(TextLoader(cfg, TOK, 512, 8, seed=0))
        next(it)
        start = time.perf_counter()
        for _ in range(40):
            next(it)
        rate = 40 * 8 * 512 / (time.perf_counter() - start)
        print(f"\ntext pipeline, byte tokenizer, num_workers={workers}: {rate:,.0f} tokens/s")

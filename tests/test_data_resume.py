"""Exact resume: a loader rebuilt from `state_dict()` continues with the very batches of an uninterrupted run."""
from __future__ import annotations

import io

import pytest
import torch

from mm_llama.data import DataConfig, TextLoader
from test_data_shards import ByteTokenizer, text_shards, write_shard

TOK = ByteTokenizer()
SEQ, BATCH = 24, 3


def mixed_corpus(tmp_path) -> list[dict]:
    """Two weighted sources, small enough that the runs below cross several epochs, one with bad data."""
    text_shards(tmp_path / "web", "web", 5, 4, words=2)
    text_shards(tmp_path / "code", "code", 2, 3, words=5)
    write_shard(tmp_path / "code" / "code-000002.tar", [{"__key__": "bad", "txt": b"\xff"}, {"__key__": "ok", "txt": "code s2 d1 w"}])
    (tmp_path / "code" / "code-000003.tar").write_bytes(b"garbage" * 200)
    whole = text_shards(tmp_path / "tmp", "web", 1, 8, words=2)[0].read_bytes()
    (tmp_path / "web" / "web-000005.tar").write_bytes(whole[: len(whole) * 3 // 4])  # breaks after 5 samples
    return [{"name": "web", "shards": "web/web-*.tar", "weight": 0.7}, {"name": "code", "shards": "code/code-*.tar", "weight": 0.3}]


def make(tmp_path, workers, seq_len=SEQ, **kw) -> TextLoader:
    cfg = DataConfig(root=str(tmp_path), sources=mixed_corpus(tmp_path), num_workers=workers, shuffle_buffer=8)
    return TextLoader(cfg, TOK, seq_len=seq_len, batch_size=BATCH, seed=11, **kw)


def take(loader, n, it=None):
    it = iter(loader) if it is None else it
    return [next(it) for _ in range(n)]


def through_disk(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def same(a, b) -> bool:
    return all(torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels) and torch.equal(x.doc_ids, y.doc_ids) for x, y in zip(a, b, strict=True))


def epochs_in(state: dict) -> set[int]:
    return {cur[0] for w in state["positions"] if w for cur in w["packer"]["doc"]["cursors"].values()}


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, workers):
    total = 14
    reference = make(tmp_path, workers)
    full = take(reference, total)
    assert max(epochs_in(reference.state_dict())) >= 2  # the runs below cross epoch boundaries
    # every k without workers; with workers odd k makes the second worker next, so ids are rotated on resume
    for k in range(1, total) if workers == 0 else (1, 4, 7):
        first = make(tmp_path, workers)
        assert same(take(first, k), full[:k])
        state = through_disk(first.state_dict())
        resumed = make(tmp_path, workers)
        resumed.load_state_dict(state)
        assert resumed.stats() == first.stats()
        assert same(take(resumed, total - k), full[k:])
        assert resumed.stats() == reference.stats()  # skips, documents, tokens: counted once across the resume
    assert reference.stats()["skipped_samples"] > 0 and reference.stats()["skipped_shards"] > 0


def test_a_new_iterator_continues_where_the_last_stopped(tmp_path):
    full = take(make(tmp_path, 2), 9)
    loader = make(tmp_path, 2)
    it = iter(loader)
    head = take(loader, 5, it)
    del it  # its workers had prefetched further; those batches were never handed out
    assert same(head + take(loader, 4), full)


def test_zero_and_one_worker_states_are_interchangeable(tmp_path):
    full = take(make(tmp_path, 0), 8)
    one = make(tmp_path, 1)
    take(one, 3)
    zero = make(tmp_path, 0)
    zero.load_state_dict(one.state_dict())
    assert same(take(zero, 5), full[3:])


def stream_after(batches, workers, first_worker=0) -> dict[int, list[int]]:
    """Each logical worker's token stream from consecutive batches (rows are T apart, so inputs concatenate)."""
    out: dict[int, list[int]] = {w: [] for w in range(workers)}
    for j, b in enumerate(batches):
        for row in b.tokens.tolist():
            out[(first_worker + j) % workers] += row
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_another_seq_len_continues_at_the_same_token(tmp_path, workers):
    n = max(1, workers)
    reference = stream_after(take(make(tmp_path, workers, seq_len=40), 12), n)
    k = 3
    short = make(tmp_path, workers, seq_len=SEQ)
    consumed = stream_after(take(short, k), n)
    state = through_disk(short.state_dict())
    longer = make(tmp_path, workers, seq_len=56)
    longer.load_state_dict(state)
    cont = stream_after(take(longer, 4), n, first_worker=state["next_worker"])
    for w in range(n):
        assert consumed[w] == reference[w][: len(consumed[w])]
        assert cont[w] and cont[w] == reference[w][len(consumed[w]) : len(consumed[w]) + len(cont[w])]
    assert all(b.tokens.shape == (BATCH, 56) for b in take(longer, 1))


def test_state_is_plain_data_and_rank_aware(tmp_path):
    loaders = [make(tmp_path, 0, rank=r, world_size=2) for r in range(2)]
    batches = [take(loader, 3) for loader in loaders]
    assert not same(batches[0], batches[1])
    state = loaders[1].state_dict()
    assert through_disk(state) == state
    again = make(tmp_path, 0, rank=1, world_size=2)
    again.load_state_dict(state)
    assert same(take(again, 2), take(loaders[1], 2))


def test_mismatched_state_is_refused_with_the_reason(tmp_path):
    loader = make(tmp_path, 2)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="workers: saved 2, now 1"):
        make(tmp_path, 0).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size: saved 1, now 2"):
        make(tmp_path, 2, world_size=2).load_state_dict(state)
    other = DataConfig(root=str(tmp_path), sources=mixed_corpus(tmp_path)[:1], num_workers=2)
    with pytest.raises(ValueError, match="sources: saved"):
        TextLoader(other, TOK, SEQ, BATCH, seed=11).load_state_dict(state)
    with pytest.raises(ValueError, match="not a TextLoader state"):
        loader.load_state_dict({"step": 3})

"""The image, speech and dialog loaders resume at another number of ranks (and workers) without skipping data.

A run of R ranks reads k batches per rank and saves every rank's state; loaders of R' ranks (built in this
process with `rank=r, world_size=R'`) continue from those states with `load_state_dicts`, as the engine does,
and read to the end of the epoch. Each sample of the epoch must then be delivered: the union of before and
after is the single run's epoch, neither part repeats a sample, and a sample is read twice only if an old
rank was partway through its shard (never when the new ranks are at least as many as the old, which
stood level). The rule is `mm_llama/data/resplit.py`'s, shared with the text loader.
"""
from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from mm_llama.config.speech import SpeechConfig
from mm_llama.data.config import DataConfig
from mm_llama.data.dialog import PreferenceLoader, RecordSourceStream, SFTLoader
from mm_llama.data.image_text import ImageLoader
from mm_llama.data.resplit import resplit, summed
from mm_llama.data.speech_loader import SpeechLoader
from mm_llama.data.text_stream import derive_seed

SEED = 5


def write_shards(root, n_shards: int, per_shard: int, member, prefix: str = "x") -> DataConfig:
    """Source `prefix`: shards `{prefix}-00000s.tar` of samples keyed `{prefix}{s}i{i}`; `member(s, i)` gives the
    sample's other members."""
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{prefix}-{s:06d}.tar"), mtime=0) as sink:
            for i in range(per_shard):
                sink.write({"__key__": f"{prefix}{s}i{i}", **member(s, i)})
    return DataConfig(root=str(root), sources=[{"name": prefix, "shards": f"{prefix}-*.tar"}], shuffle_buffer=4)


def shard_of(key: str) -> str:
    return key.rsplit("i", 1)[0]


def until_epoch_end(items, streams: int) -> list[str]:
    """The keys of `(stream, key, epoch)` items up to where each of `streams` streams has begun the next epoch."""
    keys, finished = [], set()
    try:
        for stream, key, epoch in items:
            if epoch > 0:
                finished.add(stream)
                if len(finished) == streams:
                    return keys
            else:
                assert stream not in finished, "a stream went back to an earlier epoch"
                keys.append(key)
    finally:
        items.close()  # stops DataLoader workers now


def taken(items, n: int) -> list[str]:
    out = []
    for stream, key, epoch in items:
        assert epoch == 0, "the first part of the run should stay within the first epoch"
        out.append(key)
        if len(out) == n:
            items.close()
            return out


def check_resplit(make, items, *, old: int, k: int, per_batch: int, new: int, old_workers: int = 1,
                  new_workers: int = 1, sources: int = 1, level: bool = True) -> None:
    """`make(rank, world_size, workers)` builds a loader, `items(loader, workers)` yields `(stream, key, epoch)`;
    a loader has `workers · sources` streams, each with epochs of its own. `level`: the old ranks stand at the
    same place in their shares (one source, equal shards, lockstep)."""
    epoch = until_epoch_end(items(make(0, 1, 1), 1), sources)
    assert len(epoch) == len(set(epoch))  # the single run's epoch: every sample once
    olds = [make(r, old, old_workers) for r in range(old)]
    before = [key for o in olds for key in taken(items(o, old_workers), k * per_batch * old_workers)]
    states = [o.state_dict() for o in olds]
    news = [make(r, new, new_workers) for r in range(new)]
    for n in news:
        n.load_state_dicts(states)
    delivered = sum(_delivered(o) for o in olds)
    assert [_delivered(n) for n in news] == [delivered] + [0] * (new - 1)  # the counters carry over to rank 0
    after = [key for n in news for key in until_epoch_end(items(n, new_workers), new_workers * sources)]
    assert len(before) == len(set(before)) and len(after) == len(set(after))
    assert set(before) | set(after) == set(epoch)  # nothing skipped, nothing from elsewhere
    again = set(before) & set(after)
    started = {shard_of(key) for key in before} - {s for s in map(shard_of, epoch)
                                                   if all(key in before for key in epoch if shard_of(key) == s)}
    if level:
        assert {shard_of(key) for key in again} <= started  # only shards an old rank was partway through
    if level and new >= old and len({shard_of(key) for key in epoch}) >= new * new_workers:
        assert not again


def _delivered(loader) -> int:
    stats = loader.stats()
    return stats.get("examples", stats.get("utterances", stats.get("documents")))


# -------------------------------------------------------------------------------------------- the rule


def test_the_rule_starts_each_share_after_what_the_old_consumers_delivered():
    # 5 shards dealt to 2 consumers: c0 reads order[0], [2], [4]; c1 reads [1], [3]
    old = [{"n": 7, "cursors": {"x": [0, 1, 3]}}, {"n": 4, "cursors": {"x": [0, 0, 1]}}]  # at [2] sample 3; [1] sample 1
    assert resplit(old, {"x": 5}, 1, [0]) == [{"n": 7, "cursors": {"x": [0, 1, 1]}}]  # [0] was read to its end
    three = resplit(old, {"x": 5}, 3, range(3))  # shares: [0], [3]; [1], [4]; [2]
    assert [p["cursors"]["x"] for p in three] == [[0, 1, 0], [0, 0, 1], [0, 0, 3]]
    ahead = [{"n": 9, "cursors": {"x": [1, 0, 2]}}, {"n": 5, "cursors": {"x": [0, 1, 0]}}]  # c0 is in the next epoch
    assert resplit(ahead, {"x": 5}, 1, [0])[0]["cursors"]["x"] == [0, 3, 0]
    assert resplit(ahead, {"x": 5}, 4, [1])[0]["cursors"]["x"] == [0, 1, 0]  # its share [1] is read: next epoch
    # 2 shards, 3 consumers: each reads every shard and takes samples c, c + 3, ...; [0] is read to sample 3, 1, 5
    strided = [{"n": 2, "cursors": {"x": [0, 0, 4]}}, {"n": 1, "cursors": {"x": [0, 0, 2]}},
               {"n": 2, "cursors": {"x": [0, 0, 6]}}]
    assert resplit(strided, {"x": 2}, 1, [0])[0]["cursors"]["x"] == [0, 0, 4]  # sample 4 is c1's, not delivered
    assert resplit([None, None], {"x": 2}, 1, [0]) == [{"n": 0, "cursors": {"x": [0, 0, 0]}}]
    assert summed([{"a": 1, "s": {"x": 1}}, None, {"a": 2, "s": {"x": 1, "y": 3}}]) == {"a": 3, "s": {"x": 2, "y": 3}}


# ------------------------------------------------------------------------------------------------ image


def _jpeg(s: int, i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (40 * s % 256, 30 * i % 256, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def keyed(sample, image, seed):
    return sample["__key__"], seed


def _image_loader(cfg):
    def make(rank, world_size, workers):
        c = cfg.model_copy(update={"num_workers": 0 if workers == 1 else workers})
        return ImageLoader(c, keyed, list, batch_size=2, seed=SEED, tile_size=28, max_tiles=1, rank=rank,
                           world_size=world_size)
    return make


def image_items(loader, workers):
    """Batches come from the logical workers in turn, the first from worker 0 (a fresh or re-split loader)."""
    for j, batch in enumerate(loader):
        for key, seed in batch:
            yield j % workers, key, next(e for e in range(99) if derive_seed(SEED, key, e) == seed)


@pytest.mark.parametrize("new", [1, 3, 4])
def test_image_loader_resplits_over_another_number_of_ranks(tmp_path, new):
    cfg = write_shards(tmp_path, 5, 4, lambda s, i: {"jpg": _jpeg(s, i)})
    check_resplit(_image_loader(cfg), image_items, old=2, k=3, per_batch=2, new=new)


@pytest.mark.parametrize("old,new,shards,per_shard", [(2, 3, 2, 6), (2, 1, 2, 6), (3, 1, 2, 6), (3, 2, 2, 6)])
def test_image_loader_resplits_when_ranks_outnumber_shards(tmp_path, old, new, shards, per_shard):
    """With fewer shards than ranks every rank reads every shard and takes every n-th sample."""
    cfg = write_shards(tmp_path, shards, per_shard, lambda s, i: {"jpg": _jpeg(s, i)})
    check_resplit(_image_loader(cfg), image_items, old=old, k=1, per_batch=2, new=new)


def test_image_loader_resplits_over_another_number_of_workers(tmp_path):
    cfg = write_shards(tmp_path, 6, 3, lambda s, i: {"jpg": _jpeg(s, i)})
    check_resplit(_image_loader(cfg), image_items, old=2, k=2, per_batch=2, new=1, new_workers=2)
    check_resplit(_image_loader(cfg), image_items, old=1, old_workers=2, k=2, per_batch=2, new=3)


def test_image_loader_with_two_sources_skips_nothing(tmp_path):
    """Mixed sources leave the ranks at different places in each (not level): still nothing is skipped."""
    a = write_shards(tmp_path, 4, 3, lambda s, i: {"jpg": _jpeg(s, i)}, prefix="a")
    b = write_shards(tmp_path, 4, 3, lambda s, i: {"jpg": _jpeg(s + 7, i)}, prefix="b")
    cfg = a.model_copy(update={"sources": [*a.sources, b.sources[0].model_copy(update={"weight": 0.5})]})

    def items(loader, workers):  # each source has epochs of its own: a stream per (worker, source)
        for j, (worker, key, epoch) in enumerate(image_items(loader, workers)):
            yield (worker, key[0]), key, epoch

    for new in (1, 3):
        check_resplit(_image_loader(cfg), items, old=2, k=2, per_batch=2, new=new, sources=2, level=False)


# ----------------------------------------------------------------------------------------------- speech


def _wav(s: int, i: int) -> bytes:
    t = np.arange(4000) / 16_000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * (200 + 50 * s + 10 * i) * t)).astype(np.float32), 16_000, format="WAV")
    return buf.getvalue()


def speech_items(loader, workers):
    """One utterance a batch; the loader's position after it holds the epoch it came from."""
    for batch in loader:
        yield 0, batch.keys[0].rsplit(":", 1)[-1], loader.position["cursors"]["x"][0]  # keys are `url:key`


@pytest.mark.parametrize("new", [1, 3, 4])
def test_speech_loader_resplits_over_another_number_of_ranks(tmp_path, new):
    cfg = write_shards(tmp_path, 4, 3, lambda s, i: {"wav": _wav(s, i)})
    speech = SpeechConfig()

    def make(rank, world_size, workers):
        return SpeechLoader(cfg, speech, 1, SEED, rank, world_size)

    check_resplit(make, speech_items, old=2, k=2, per_batch=1, new=new)


# ----------------------------------------------------------------------------------------------- dialog


@pytest.fixture
def chat(demo_data):
    from mm_llama.text import ChatFormat, load_tokenizer

    return ChatFormat(load_tokenizer(demo_data / "tokenizer.model"))


def _ranking(s: int, i: int) -> dict:
    return {"json": {"prompt": [{"role": "user", "content": f"q {s} {i}"}], "responses": [f"yes {i}", f"no {s}"]}}


class TaggedRankings(PreferenceLoader):
    """Its examples carry the key and epoch of their record (set by the patched `RecordSourceStream.example`)."""

    def encode(self, record, n):
        example = super().encode(record, n)
        example.tag = record.tag
        return example


@pytest.fixture
def tagged_records(monkeypatch):
    example = RecordSourceStream.example

    def tagged(self, sample, shard, epoch):
        record = example(self, sample, shard, epoch)
        record.tag = (sample["__key__"], epoch)
        return record

    monkeypatch.setattr(RecordSourceStream, "example", tagged)


def dialog_items(loader, workers):
    for batch in loader:
        key, epoch = batch[0].tag
        yield 0, key, epoch


@pytest.mark.parametrize("new", [1, 3, 4])
def test_preference_loader_resplits_over_another_number_of_ranks(tmp_path, chat, tagged_records, new):
    cfg = write_shards(tmp_path, 4, 4, _ranking)

    def make(rank, world_size, workers):
        return TaggedRankings(cfg, SEED, rank, world_size, chat=chat, batch_size=1)

    check_resplit(make, dialog_items, old=2, k=3, per_batch=1, new=new)


def test_dpo_batches_resume_at_another_number_of_ranks(tmp_path, chat):
    from mm_llama.train.tasks.dpo import NumberedBatches

    cfg = write_shards(tmp_path, 4, 4, _ranking)
    make = lambda r, w: NumberedBatches(PreferenceLoader(cfg, SEED, r, w, chat=chat, batch_size=2,  # noqa: E731
                                                         collate=lambda examples: SimpleNamespace(examples=examples)))
    olds = [make(r, 2) for r in range(2)]
    for o in olds:
        it = iter(o)
        [next(it) for _ in range(3)]
    states = [o.state_dict() for o in olds]
    for r in range(3):
        n = make(r, 3)
        n.load_state_dicts(states)
        assert n.delivered == 3 and next(iter(n)).index == 3
    with pytest.raises(ValueError, match="not DPO loader states"):
        make(0, 1).load_state_dicts([s["loader"] for s in states])


def _dialog(s: int, i: int) -> dict:
    return {"json": {"messages": [{"role": "user", "content": f"q {s} {i}"}, {"role": "assistant", "content": "a"}]}}


def test_sft_loader_resplits(tmp_path, chat):
    cfg = write_shards(tmp_path, 4, 4, _dialog)
    olds = [SFTLoader(cfg, SEED, r, 2, chat=chat, seq_len=40, batch_size=1) for r in range(2)]
    for o in olds:
        next(iter(o))
    states = [o.state_dict() for o in olds]
    one = SFTLoader(cfg, SEED, 0, 1, chat=chat, seq_len=40, batch_size=1)
    one.load_state_dicts(states)
    assert one.stats()["documents"] == sum(o.stats()["documents"] for o in olds)
    assert next(iter(one)).tokens.shape == (1, 40)


# ----------------------------------------------------------------------------------------------- errors


def test_unsplittable_states_are_refused_with_the_reason(tmp_path, chat):
    cfg = write_shards(tmp_path, 4, 2, lambda s, i: {"jpg": _jpeg(s, i), **_dialog(s, i)})
    make = _image_loader(cfg)
    olds = [make(r, 2, 1) for r in range(2)]
    for o in olds:
        next(iter(o))
    states = [o.state_dict() for o in olds]
    with pytest.raises(ValueError, match=r"data state 0 is that of rank 1 of 2, but 2 states must be those of ranks 0..1"):
        make(0, 1, 1).load_state_dicts(states[::-1])
    with pytest.raises(ValueError, match=r"data state 0 is that of rank 0 of 2, but 3 states must be those of ranks 0..2 of 3"):
        make(0, 1, 1).load_state_dicts([*states, states[1]])
    with pytest.raises(ValueError, match=r"different seed \(5, now 6\)"):
        ImageLoader(cfg, keyed, list, batch_size=2, seed=6, tile_size=28, max_tiles=1).load_state_dicts(states)
    fewer = DataConfig(root=str(tmp_path), sources=[{"name": "x", "shards": "x-{000000..000002}.tar"}])
    with pytest.raises(ValueError, match=r"different sources \(\{'x': 4\}, now \{'x': 3\}\)"):
        _image_loader(fewer)(0, 3, 1).load_state_dicts(states)
    broken = [dict(s) for s in states]
    broken[1]["positions"] = []
    with pytest.raises(ValueError, match=r"data state 1: expected 1 workers, as rank 0's"):
        make(0, 3, 1).load_state_dicts(broken)
    with pytest.raises(ValueError, match="not an ImageLoader state"):
        make(0, 3, 1).load_state_dicts([{"step": 3}])
    with pytest.raises(ValueError, match="expected the data states of every rank"):
        make(0, 3, 1).load_state_dicts(states[0])

    speech = [SpeechLoader(cfg, SpeechConfig(), 1, SEED, r, 2).state_dict() for r in range(2)]
    with pytest.raises(ValueError, match="not a SpeechLoader state"):
        SpeechLoader(cfg, SpeechConfig(), 1, SEED).load_state_dicts(states)
    SpeechLoader(cfg, SpeechConfig(), 1, SEED).load_state_dicts(speech)  # nothing read yet: a fresh start

    sft = SFTLoader(cfg, SEED, 0, 1, chat=chat, seq_len=40, batch_size=1)
    next(iter(sft))
    with pytest.raises(ValueError, match="different kind"):
        PreferenceLoader(cfg, SEED, 0, 2, chat=chat, batch_size=1).load_state_dicts([sft.state_dict()])
    saved = sft.state_dict()
    saved["shards"] = {"x": 9}
    with pytest.raises(ValueError, match=r"data state 0 was saved with shard counts \{'x': 9\} \(now \{'x': 4\}\)"):
        SFTLoader(cfg, SEED, 0, 2, chat=chat, seq_len=40, batch_size=1).load_state_dicts([saved])
    with pytest.raises(ValueError, match=r"shards: saved \{'x': 9\}, now \{'x': 4\}"):
        SFTLoader(cfg, SEED, 0, 1, chat=chat, seq_len=40, batch_size=1).load_state_dict(saved)

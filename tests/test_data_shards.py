"""Shard lists (paths, globs, braces, root, pipe:), shard reading with error accounting, sample text.

Also holds the small helpers the other tests/test_data_*.py files import.
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from mm_llama.config import ConfigError
from mm_llama.data import DataConfig, SourceConfig, check_sources, expand_shards
from mm_llama.data.accounting import Counters
from mm_llama.data.shards import read_shard
from mm_llama.data.text_stream import SkipSample, sample_text


class ByteTokenizer:
    """Test stand-in for mm_llama.text.Tokenizer: ids are UTF-8 bytes, then bos=256, eos=257."""

    bos_id, eos_id, n_words = 256, 257, 258

    def encode(self, text: str, *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + list(text.encode("utf-8")) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def write_shard(path: Path, samples: list[dict]) -> Path:
    """A tar shard; each sample is a dict of member name -> str/bytes/dict, with `__key__`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), mtime=0) as sink:
        for s in samples:
            sink.write(s)
    return path


def text_shards(folder: Path, name: str, n_shards: int, docs_per_shard: int, words: int = 3) -> list[Path]:
    """Shards `name-00000i.tar` of documents "<name> s<i> d<j> w w w" (unique, recognisable)."""
    return [
        write_shard(
            folder / f"{name}-{i:06d}.tar",
            [{"__key__": f"s{i}d{j}", "txt": f"{name} s{i} d{j}" + " w" * (words + (i + j) % 4)} for j in range(docs_per_shard)],
        )
        for i in range(n_shards)
    ]


def collect(errors: list):
    return lambda kind, message: errors.append((kind, message))


def read_errors(path) -> list:
    errors: list = []
    list(read_shard(str(path), collect(errors)))
    return errors


# -- shard lists --------------------------------------------------------------------------------


def test_globs_braces_root_and_absolute(tmp_path):
    text_shards(tmp_path / "text", "a", 3, 1)
    root = str(tmp_path)
    urls, missing = expand_shards("text/a-{000000..000002}.tar", root)
    assert missing == [] and urls == [str(tmp_path / f"text/a-{i:06d}.tar") for i in range(3)]
    urls, _ = expand_shards("text/a-*.tar", root)
    assert urls == [str(tmp_path / f"text/a-{i:06d}.tar") for i in range(3)]
    absolute = str(tmp_path / "text/a-000001.tar")
    urls, _ = expand_shards([absolute, "text/a-00000[02].tar"], "/somewhere/else")
    assert urls == [absolute]  # the relative glob is resolved under the other root, where nothing matches
    assert expand_shards(f"file://{absolute}", "/somewhere/else") == ([absolute], [])
    urls, missing = expand_shards("text/a-000000.tar::text/a-000002.tar", root)
    assert urls == [str(tmp_path / "text/a-000000.tar"), str(tmp_path / "text/a-000002.tar")] and not missing


def test_pipe_urls_are_kept_and_read(tmp_path):
    shard = text_shards(tmp_path, "p", 1, 3)[0]
    urls, missing = expand_shards(f"pipe:cat {shard}", "/not/used")
    assert urls == [f"pipe:cat {shard}"] and missing == []
    errors = []
    keys = [s["__key__"] for s in read_shard(urls[0], collect(errors))]
    assert keys == ["s0d0", "s0d1", "s0d2"] and errors == []
    urls, _ = expand_shards(f"pipe:cat {tmp_path}/p-{{000000..000000}}.tar", "/")
    assert urls == [f"pipe:cat {tmp_path}/p-000000.tar"]


def test_missing_paths_name_every_one(tmp_path):
    text_shards(tmp_path / "text", "a", 1, 1)
    cfg = DataConfig(
        root=str(tmp_path),
        sources=[
            SourceConfig(name="good", shards="text/a-000000.tar"),
            SourceConfig(name="web", shards=["text/a-000000.tar", "text/missing-{000..001}.tar"]),
        ],
        heldout=[SourceConfig(name="val", shards="val/*.tar")],
    )
    with pytest.raises(ConfigError) as e:
        check_sources(cfg)
    msg = str(e.value)
    assert "'web'" in msg and "missing-000.tar" in msg and "missing-001.tar" in msg
    assert "'val'" in msg and "val/*.tar (no file matches)" in msg
    assert "'good'" not in msg
    check_sources(cfg.model_copy(update={"sources": cfg.sources[:1], "heldout": []}))  # no error


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="weight must be > 0"):
        SourceConfig(name="a", shards="x.tar", weight=0)
    with pytest.raises(ValueError, match="repeated: a"):
        DataConfig(sources=[{"name": "a", "shards": "x.tar"}, {"name": "a", "shards": "y.tar"}])
    with pytest.raises(ValueError, match="text_key"):
        SourceConfig(name="a", shards="x.tar", text_key="json.")
    with pytest.raises(ValueError, match="extra"):
        DataConfig(sources=[{"name": "a", "shards": "x.tar"}], num_wokers=2)
    with pytest.raises(ValueError, match="at least one training source"):
        DataConfig(sources=[])
    assert DataConfig(root="/r", sources=[{"name": "a", "shards": "x"}]).tokenizer_path == Path("/r/tokenizer.model")


# -- reading shards with accounting -------------------------------------------------------------


def test_truncated_garbage_missing_and_failing_pipe_are_reported(tmp_path):
    good = text_shards(tmp_path, "g", 1, 40, words=200)[0]
    data = good.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)

    errors: list = []
    whole = list(read_shard(str(good), collect(errors)))
    assert len(whole) == 40 and errors == []

    part = list(read_shard(str(truncated), collect(errors)))
    assert 0 < len(part) < 40
    assert [s["__key__"] for s in part] == [s["__key__"] for s in whole[: len(part)]]
    assert len(errors) == 1 and errors[0][0] == "shard" and "truncated.tar" in errors[0][1]

    # cut where tarfile alone would see a complete archive: at a member boundary, inside a header, inside the
    # end-of-archive blocks; a cut inside a member's data breaks the stream itself
    member = 1024  # each of these small documents: a 512-byte header and one data block
    for cut, whole_samples in ((20 * member, 20), (20 * member + 100, 20), (40 * member + 512, 40),
                               (20 * member + 600, 19)):
        errors.clear()
        cut_file = tmp_path / f"cut{cut}.tar"
        cut_file.write_bytes(data[:cut])
        part = list(read_shard(str(cut_file), collect(errors)))
        assert [s["txt"] for s in part] == [s["txt"] for s in whole[:whole_samples]], cut
        assert len(errors) == 1 and errors[0][0] == "shard" and f"cut{cut}.tar" in errors[0][1], (cut, errors)
    assert "truncated tar stream" in read_errors(tmp_path / f"cut{20 * member}.tar")[0][1]

    for url in (str(garbage), str(tmp_path / "nope.tar"), f"pipe:cat {tmp_path}/nope.tar"):
        errors.clear()
        assert list(read_shard(url, collect(errors))) == []
        assert [k for k, _ in errors] == ["shard"] and errors[0][1].startswith(url), errors


def test_stopping_early_closes_a_pipe_quietly(tmp_path):
    shard = text_shards(tmp_path, "big", 1, 300, words=400)[0]
    errors: list = []
    it = read_shard(f"pipe:cat {shard}", collect(errors))
    next(it)
    it.close()
    assert errors == []


def test_counters_log_and_count(caplog):
    c = Counters()
    with caplog.at_level("WARNING", logger="mm_llama.data"):
        c.skip("shard", "x.tar: cannot open")
        c.skip("sample", "x.tar sample 'k': empty")
    assert (c.skipped_shards, c.skipped_samples) == (1, 1)
    assert "x.tar: cannot open" in caplog.text


# -- the text of a sample -----------------------------------------------------------------------


def _raw(tmp_path, sample) -> dict:
    shard = write_shard(tmp_path / "one.tar", [sample])
    return next(read_shard(str(shard), lambda *a: None))


def test_sample_text_fields_and_json_paths(tmp_path):
    s = _raw(tmp_path, {"__key__": "k", "txt": "héllo", "json": {"text": "from json", "meta": {"body": "deep"}, "n": 3}})
    assert sample_text(s, "txt") == "héllo"
    assert sample_text(s, "json.text") == "from json"
    assert sample_text(s, "json.meta.body") == "deep"
    with pytest.raises(SkipSample, match="no field 'missing'"):
        sample_text(s, "json.missing")
    with pytest.raises(SkipSample, match="int, not a string"):
        sample_text(s, "json.n")
    with pytest.raises(SkipSample, match="no 'text' member"):
        sample_text(s, "text")
    s = _raw(tmp_path, {"__key__": "k", "meta.json": {"text": "dotted member"}})
    assert sample_text(s, "meta.json.text") == "dotted member"


def test_sample_text_rejects_bad_utf8_and_empty(tmp_path):
    s = _raw(tmp_path, {"__key__": "k", "txt": b"ok \xff\xfe broken"})
    with pytest.raises(SkipSample, match="not UTF-8"):
        sample_text(s, "txt")
    s = _raw(tmp_path, {"__key__": "k", "txt": "  \n\t "})
    with pytest.raises(SkipSample, match="empty document"):
        sample_text(s, "txt")
    s = _raw(tmp_path, {"__key__": "k", "json": b"{not json"})
    with pytest.raises(SkipSample, match="not valid JSON"):
        sample_text(s, "json.text")


def test_raw_tar_with_a_partial_sample(tmp_path):
    """A tar whose last sample lacks its text member: read as a sample without `txt`."""
    path = tmp_path / "partial.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.txt", b"first"), ("a.json", b"{}"), ("b.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(read_shard(str(path), lambda *a: None))
    assert [s["__key__"] for s in samples] == ["a", "b"]
    with pytest.raises(SkipSample, match="no 'txt' member"):
        sample_text(samples[1], "txt")

"""End-to-end curation over shards with planted duplicates and junk: exact removal counts,
nothing outside the rules removed, inputs untouched, resume per shard, local/process/Dask parity."""
import hashlib
import json

import numpy as np
import pytest
import webdataset as wds

from mm_llama.config import ConfigError, load_config
from mm_llama.curate.config import CurateConfig
from mm_llama.curate.runner import curate
from mm_llama.curate.shards import read_shard
from mm_llama.curate.synthetic import document, planted_corpus, vocabulary

BOILER = "Subscribe to our newsletter for weekly updates"
CODE = "import os\n\ndef main():\n    path = os.getcwd()\n    return path\n\nif __name__ == '__main__':\n    main()\n"
MATH = "Solve for x: 2x + 3 = 11. Then x = 4. Compute the integral of $x^2$ from 0 to 1, which is $\\frac{1}{3}$."


def write_shards(root, samples, per_shard):
    paths = []
    for s in range(0, len(samples), per_shard):
        path = root / f"part-{s // per_shard:04d}.tar"
        with wds.TarWriter(str(path)) as w:
            for key, text, meta in samples[s : s + per_shard]:
                w.write({"__key__": key, "txt": text, "json": meta})
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Shards with planted removals; returns (input dir, {key: expected rule}, samples)."""
    root = tmp_path_factory.mktemp("raw")
    docs, dup = planted_corpus(60, 6, 5, seed=11, edits=1, n_words=150)
    rng = np.random.default_rng(5)
    vocab = vocabulary(3000, np.random.default_rng(11))
    expect: dict[str, str] = {}
    samples = []
    copied = set(dup.values())
    boiler_docs = [i for i in range(60) if i not in copied][:10]
    for i, text in enumerate(docs):
        if i in boiler_docs:
            text = text + "\n" + BOILER
        key = f"doc{i:03d}"
        samples.append((key, text, {"source": "web"}))
        if i in dup:
            expect[key] = "minhash_duplicate"
    # URL duplicates: the newer version comes first in the corpus and must still win.
    for j in range(4):
        url = f"https://example.org/page/{j}"
        samples.append((f"urlnew{j}", document(rng, vocab, 120), {"url": url, "date": "2023-06-01"}))
        samples.append((f"urlold{j}", document(rng, vocab, 120), {"url": url + "/", "date": "2021-06-01"}))
        expect[f"urlold{j}"] = "url_duplicate"
    samples.append(("onlyboiler", BOILER, {}))
    expect["onlyboiler"] = "lines_emptied"
    samples.append(("repetitive", "buy cheap pills now " * 40, {}))
    expect["repetitive"] = "dup_ngrams"
    samples.append(("dirty", document(rng, vocab, 100) + " darnit heck darnit", {}))
    expect["dirty"] = "word_list"
    junk = " ".join(hashlib.sha1(str(k).encode()).hexdigest()[:10] for k in range(120))
    samples.append(("gibberish", junk, {}))
    expect["gibberish"] = "token_kl"
    samples.append(("code", CODE, {}))
    samples.append(("math", MATH, {}))
    order = np.random.default_rng(1).permutation(len(samples) - 60) + 60  # originals stay first
    samples = samples[:60] + [samples[i] for i in order]
    (root / "words.txt").write_text("darnit\nheck\n")
    write_shards(root, samples, per_shard=25)
    return root, expect, samples


def make_config(root, out, **over):
    data = {
        "inputs": [str(root / "part-*.tar")],
        "output": str(out),
        "workers": 1,
        "minhash": {"num_perm": 128, "bands": 16, "rows": 8, "threshold": 0.7},
        "lines": {"max_repeats": 6, "bucket_docs": 1000},
        "heuristics": {"word_list": {"path": str(root / "words.txt"), "max_count": 2}, "token_kl": {"max_kl": 4.0}},
        "language": {"enabled": False},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return CurateConfig.model_validate(data)


def read_output(out):
    return {s.key: s for p in sorted(out.rglob("part-*.tar")) for s in read_shard(p)}


def digest(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    root, _, _ = corpus
    before = digest(root)
    out = tmp_path_factory.mktemp("curated")
    report = curate(make_config(root, out))
    return out, report, before


def test_planted_removals_exact(corpus, baseline):
    root, expect, samples = corpus
    out, report, before = baseline
    counts = {}
    for rule in expect.values():
        counts[rule] = counts.get(rule, 0) + 1
    assert report["removed"] == counts
    assert report["documents_in"] == len(samples)
    assert report["documents_out"] == len(samples) - len(expect)
    kept = read_output(out)
    assert set(kept) == {k for k, _, _ in samples} - set(expect)  # nothing outside the rules
    assert report["lines_removed"] == 10 + 1  # the boilerplate line in 10 kept docs and in the emptied one
    texts = {k: t for k, t, _ in samples}
    for key, s in kept.items():
        assert BOILER not in s.text
        assert s.text == texts[key].replace(BOILER, "")  # everything else untouched
        assert s.meta["domain"] in ("general", "code", "math_reasoning", "multilingual")
    assert kept["code"].meta["domain"] == "code" and kept["math"].meta["domain"] == "math_reasoning"
    assert kept["urlnew0"].meta["url"] == "https://example.org/page/0"
    assert digest(root) == before  # inputs never modified


def test_reports_say_why(baseline, corpus):
    out, report, _ = baseline
    _, expect, _ = corpus
    for rule in set(expect.values()):
        ex = report["examples"][rule][0]
        assert expect[ex["key"]] == rule and ex["why"] and ex["shard"].startswith("part-")
    assert "newer 'urlnew" in report["examples"]["url_duplicate"][0]["why"]
    clusters = [json.loads(line) for line in (out / "reports" / "minhash_clusters.jsonl").read_text().splitlines()]
    assert sum(len(c["removed"]) for c in clusters) == report["dedup"]["minhash_duplicate"] == 11
    assert report["dedup"]["minhash_clusters"] == len(clusters)
    assert all(r["jaccard"] >= 0.7 for c in clusters for r in c["removed"])
    shard_reports = sorted((out / "reports" / "shards").glob("*.json"))
    assert len(shard_reports) == 4
    assert json.loads((out / "report.json").read_text())["documents_out"] == report["documents_out"]


def test_resume_redoes_only_missing_shards(corpus, baseline, tmp_path):
    root, _, _ = corpus
    out = tmp_path / "out"
    config = make_config(root, out)
    first = curate(config)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.tar")}
    (out / "reports" / "shards" / "part-0002.tar.json").unlink()
    (out / "part-0002.tar").unlink()
    second = curate(config)
    assert {k: v for k, v in second.items() if k != "dedup"} == {k: v for k, v in first.items() if k != "dedup"}
    for p in out.glob("part-*.tar"):
        if p.name != "part-0002.tar":
            assert p.stat().st_mtime_ns == mtimes[p.name]
    assert read_output(out).keys() == read_output(baseline[0]).keys()
    with pytest.raises(ConfigError, match="other settings.*lines"):
        curate(make_config(root, out, lines={"max_repeats": 3}))


def test_parallel_engines_match(corpus, baseline, tmp_path):
    pytest.importorskip("dask")
    from dask.distributed import LocalCluster

    root, _, _ = corpus
    reference = {k: (s.text, s.meta) for k, s in read_output(baseline[0]).items()}
    runs = [make_config(root, tmp_path / "pool", workers=2), make_config(root, tmp_path / "dask", engine="dask", workers=2)]
    for config in runs:
        curate(config)
        assert {k: (s.text, s.meta) for k, s in read_output(tmp_path / config.output.split("/")[-1]).items()} == reference
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        out = tmp_path / "cluster"
        curate(make_config(root, out, engine="dask", dask_address=cluster.scheduler_address))
    assert {k: (s.text, s.meta) for k, s in read_output(out).items()} == reference


def test_split_output_by_domain(corpus, tmp_path):
    root, expect, samples = corpus
    out = tmp_path / "split"
    report = curate(make_config(root, out, domains={"split_output": True}))
    by_domain = {d.name: {s.key for p in d.glob("*.tar") for s in read_shard(p)} for d in out.iterdir() if d.is_dir() and d.name in report["domains"]}
    assert {d: len(k) for d, k in by_domain.items()} == report["domains"]
    assert "code" in by_domain["code"] and "math" in by_domain["math_reasoning"]
    assert not list(out.glob("part-*.tar"))


def test_language_keep(tmp_path):
    from test_curate_filters import KNOWN

    raw = tmp_path / "raw"
    raw.mkdir()
    write_shards(raw, [(f"s{code}", text, {}) for code, text in KNOWN.items()], per_shard=5)
    config = CurateConfig(inputs=[str(raw / "*.tar")], output=str(tmp_path / "out"), workers=1,
                          language={"languages": ["en", "fr", "de", "es", "it"], "keep": ["en", "fr"]})
    report = curate(config)
    assert report["removed"] == {"language": 3}
    kept = read_output(tmp_path / "out")
    assert {k: s.meta["lang"] for k, s in kept.items()} == {"sen": "en", "sfr": "fr"}
    assert kept["sfr"].meta["domain"] == "multilingual"


def test_config_errors(corpus, tmp_path):
    root, _, _ = corpus
    path = tmp_path / "c.yaml"
    path.write_text(f"inputs: ['{root}/part-*.tar']\noutput: {tmp_path}/o\nminhash: {{treshold: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*minhash.treshold.*did you mean 'threshold'"):
        load_config(CurateConfig, path)
    with pytest.raises(ConfigError, match="no such shard.*nothing-"):
        curate(CurateConfig(inputs=[str(root / "nothing-*.tar")], output=str(tmp_path / "o")))
    with pytest.raises(ConfigError, match="never writes over its inputs"):
        curate(CurateConfig(inputs=[str(root / "part-*.tar")], output=str(root)))
    with pytest.raises(ConfigError, match="language.keep.*zz"):
        curate(make_config(root, tmp_path / "o", language={"enabled": True, "keep": ["en", "zz"]}))

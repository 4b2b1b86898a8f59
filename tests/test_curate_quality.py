"""The pluggable quality scorer: LM perplexity (tiny random Transformer + byte tokenizer) and plug-ins."""
import math

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from mm_llama.config import ConfigError
from mm_llama.curate.config import CurateConfig, QualityConfig
from mm_llama.curate.quality import PerplexityScorer, build_scorer
from mm_llama.curate.runner import curate
from mm_llama.curate.shards import read_shard
from mm_llama.model import LlamaArgs, Transformer


class ByteTokenizer:
    """Stand-in tokenizer: UTF-8 bytes, BOS = 256."""

    bos_id = 256

    def encode(self, text, *, bos, eos):
        return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    args = LlamaArgs(dim=32, n_layers=1, n_heads=2, vocab_size=260, multiple_of=16, max_seq_len=128)
    return Transformer(args).eval()


def reference_perplexity(model, text):
    ids = torch.tensor([[256] + list(text.encode())])
    logits = model(ids)[0, :-1]
    return math.exp(F.cross_entropy(logits, ids[0, 1:]).item())


def test_perplexity_matches_reference_and_ignores_padding(lm):
    texts = ["hello world", "a much longer document about many things", "x"]
    scorer = PerplexityScorer(lm, ByteTokenizer(), batch_size=3)
    got = scorer.score(texts)
    for g, t in zip(got, texts):
        assert g == pytest.approx(reference_perplexity(lm, t), rel=1e-4)
    assert PerplexityScorer(lm, ByteTokenizer(), batch_size=1).score(texts) == pytest.approx(got, rel=1e-5)
    # Truncation to max_tokens: only the first 5 bytes are scored.
    assert PerplexityScorer(lm, ByteTokenizer(), max_tokens=5).score([texts[1]])[0] == pytest.approx(
        reference_perplexity(lm, texts[1][:5]), rel=1e-4)


class LengthScorer:
    """A plug-in: the score is the text length."""

    def __init__(self, scale=1.0):
        self.scale = scale

    def score(self, texts):
        return [self.scale * len(t) for t in texts]


def test_plugin_scorer_filters_in_a_run(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with wds.TarWriter(str(raw / "a.tar")) as w:
        for i, text in enumerate(["short", "a bit longer text", "tiny", "the longest text of them all here"]):
            w.write({"__key__": f"k{i}", "txt": text, "json": {}})
    config = CurateConfig(inputs=[str(raw / "a.tar")], output=str(tmp_path / "out"), workers=1,
                          language={"enabled": False},
                          quality={"scorer": f"{__name__}:LengthScorer", "options": {"scale": 2.0}, "min_score": 20})
    report = curate(config)
    assert report["removed"] == {"quality": 2}
    kept = {s.key: s.meta["quality"] for s in read_shard(tmp_path / "out" / "a.tar")}
    assert kept == {"k1": 34.0, "k3": 66.0}


def test_scorer_config_errors():
    assert build_scorer(QualityConfig()) is None
    with pytest.raises(ConfigError, match="quality.options.*tokenizer"):
        build_scorer(QualityConfig(scorer="perplexity", options={"model": "m"}))
    with pytest.raises(ConfigError, match="quality.scorer.*'package.module:factory'"):
        build_scorer(QualityConfig(scorer="fasttext"))
    with pytest.raises(ConfigError, match="without score"):
        build_scorer(QualityConfig(scorer="collections:Counter"))

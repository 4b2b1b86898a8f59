"""Line dedup, heuristic filters, URL dedup, language identification and domain tags."""
import math

import numpy as np
import pytest

from mm_llama.config import ConfigError
from mm_llama.curate.config import DomainConfig, HeuristicsConfig
from mm_llama.curate.domains import DomainTagger
from mm_llama.curate.heuristics import (
    HeuristicFilter,
    count_listed,
    duplicated_ngram_fraction,
    kl_from_corpus,
    token_histogram,
)
from mm_llama.curate.language import LanguageIdentifier
from mm_llama.curate.lines import document_line_hashes, frequent_lines, normalize_line, remove_lines
from mm_llama.curate.urls import NewestPerUrl, normalize_url


def test_line_normalisation_and_frequency():
    assert normalize_line("  Copyright 2023   ACME  ") == normalize_line("copyright 1999 acme")
    docs = [f"unique line {i}\nShare this page\n" for i in range(7)] + ["Share this page\nShare this page\nother"]
    hashes = [document_line_hashes(d) for d in docs]
    # "share this page" is in 8 documents; with max_repeats 7 it is frequent, with 8 it is not.
    frequent = frequent_lines(hashes, max_repeats=7)
    assert len(frequent) == 1
    assert len(frequent_lines(hashes, max_repeats=8)) == 0
    # "unique line N" normalises to "unique line 0" for every N: 7 documents.
    assert len(frequent_lines(hashes, max_repeats=6)) == 2
    kept, dropped = remove_lines("keep me\nShare THIS page\n\nkeep too", frequent)
    assert kept == "keep me\n\nkeep too" and dropped == ["Share THIS page"]


def test_duplicated_ngram_fraction_exact_value():
    tokens = "aa bb cc dd aa bb cc xx".split()
    # The 3-gram "aa bb cc" occurs twice: words 0-2 and 4-6 covered, 12 of 16 characters.
    assert duplicated_ngram_fraction(tokens, 3) == pytest.approx(12 / 16)
    assert duplicated_ngram_fraction(tokens, 4) == 0.0
    assert duplicated_ngram_fraction("a b".split(), 5) == 0.0


def test_word_list_counts_words_and_phrases(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# comment\nbadword\nvery bad phrase\n\n")
    f = HeuristicFilter(HeuristicsConfig(dup_ngrams={"enabled": False}, word_list={"path": str(path), "max_count": 1}))
    assert count_listed("badword and a very bad phrase and BADWORD".lower().split(), f.phrases) == 3
    assert f.check("one badword here is fine") is None
    assert f.check("badword badword") == ("word_list", "2 listed words > 1")
    with pytest.raises(ConfigError, match="heuristics.word_list.path"):
        HeuristicFilter(HeuristicsConfig(word_list={"path": str(tmp_path / "none.txt"), "max_count": 1}))


def test_kl_from_corpus_matches_formula():
    corpus = np.array([6, 2, 0, 0])
    doc = np.array([1, 0, 3, 0])
    q = (corpus + 1) / (8 + 4)
    expected = 0.25 * math.log(0.25 / q[0]) + 0.75 * math.log(0.75 / q[2])
    assert kl_from_corpus(doc, corpus) == pytest.approx(expected)
    assert kl_from_corpus(np.zeros(4), corpus) == 0.0
    assert token_histogram(["a", "b", "a"], 16).sum() == 3


def test_heuristic_rules_and_order():
    cfg = HeuristicsConfig(min_words=3, dup_ngrams={"max_fraction": {2: 0.5}})
    f = HeuristicFilter(cfg)
    assert f.check("too short") == ("min_words", "2 words < 3")
    rule, why = f.check("spam spam spam spam spam spam")
    assert rule == "dup_ngrams" and "2-gram coverage 1.000" in why
    assert f.check("a perfectly ordinary sentence without repeats") is None


def test_url_newest_wins():
    assert normalize_url("HTTPS://www.Example.com/a/#top") == normalize_url("http://example.com/a")
    assert normalize_url("http://example.com/a?x=1") != normalize_url("http://example.com/a?x=2")
    urls = NewestPerUrl()
    urls.add(0, "http://a.org/p", "2020-01-01")
    urls.add(1, "https://a.org/p/", "2023-05-01T10:00:00")
    urls.add(2, "http://a.org/p", None)  # undated counts as oldest
    urls.add(3, "http://b.org/", "2021-01-01")
    urls.add(4, "http://b.org", "2021-01-01")  # tie: the earlier document stays
    urls.add(5, None, "2024-01-01")
    assert urls.losers() == {0: 1, 2: 1, 4: 3}


KNOWN = {
    "en": "The committee will publish its annual report on the state of public libraries next week.",
    "fr": "Le comité publiera la semaine prochaine son rapport annuel sur l'état des bibliothèques publiques.",
    "de": "Der Ausschuss wird nächste Woche seinen Jahresbericht über den Zustand der öffentlichen Bibliotheken veröffentlichen.",
    "es": "El comité publicará la próxima semana su informe anual sobre el estado de las bibliotecas públicas.",
    "it": "Il comitato pubblicherà la prossima settimana la sua relazione annuale sullo stato delle biblioteche pubbliche.",
}


def test_language_identification_known_samples():
    ident = LanguageIdentifier(["en", "fr", "de", "es", "it", "pt", "nl"])
    for code, text in KNOWN.items():
        lang, conf = ident.identify(text)
        assert lang == code and 0.5 < conf <= 1.0
    assert ident.identify("12345 678") == ("und", 0.0)
    assert LanguageIdentifier(["en", "fr"], min_confidence=0.999).identify("ok")[0] == "und"
    with pytest.raises(ConfigError, match="language.languages.*xx"):
        LanguageIdentifier(["en", "xx"])


CODE = "import os\n\ndef main():\n    path = os.getcwd()\n    return path\n"
MATH = "Solve for x: 2x + 3 = 11. Then x = 4. Compute the integral of $x^2$ from 0 to 1, which is $\\frac{1}{3}$."
PROSE = "The museum opened a new wing dedicated to local painters and their early landscapes."


def test_domain_rules():
    tagger = DomainTagger(DomainConfig())
    assert tagger.tag(CODE, "en", {}) == "code"
    assert tagger.tag(MATH, "en", {}) == "math_reasoning"
    assert tagger.tag(PROSE, "en", {}) == "general"
    assert tagger.tag(KNOWN["fr"], "fr", {}) == "multilingual"
    assert tagger.tag(PROSE, "en", {"domain": "code"}) == "code"  # trusted metadata wins
    assert DomainTagger(DomainConfig(trust_metadata=False)).tag(PROSE, "en", {"domain": "code"}) == "general"
    assert tagger.tag(PROSE, "en", {"domain": "poetry"}) == "general"  # not a known domain: ignored
    with pytest.raises(ConfigError, match="domains.options"):
        DomainTagger(DomainConfig(options={"code_fraction": 0.5}))


class _Tagger:
    def __init__(self, answer):
        self.answer = answer

    def tag(self, text, language, meta):
        return self.answer


def test_domain_plugin():
    assert DomainTagger(DomainConfig(tagger=f"{__name__}:_Tagger", options={"answer": "code"})).tag("x", "en", {}) == "code"
    with pytest.raises(ValueError, match="expected one of"):
        DomainTagger(DomainConfig(tagger=f"{__name__}:_Tagger", options={"answer": "poems"})).tag("x", "en", {})
    with pytest.raises(ConfigError, match="domains.tagger"):
        DomainTagger(DomainConfig(tagger="no_such_module:thing"))

"""MinHash signatures, LSH banding and clustering."""
import numpy as np
import pytest

from mm_llama.curate.minhash import (
    LSHDeduplicator,
    MinHasher,
    collision_probability,
    jaccard_estimate,
    optimal_bands,
    shingles,
    words,
)
from mm_llama.curate.synthetic import planted_corpus


def exact_jaccard(a: str, b: str, n: int = 5) -> float:
    """Reference: Jaccard similarity of the word n-gram sets, with plain Python sets."""
    def grams(t):
        w = words(t)
        return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}
    A, B = grams(a), grams(b)
    return len(A & B) / len(A | B)


def test_shingles_match_word_ngrams():
    text = "The cat sat on the mat. The cat sat on the mat!"
    # 12 words → 8 five-grams; the last two repeat the first two: 6 distinct.
    assert len(shingles(text, 5)) == len({tuple(words(text)[i : i + 5]) for i in range(8)}) == 6
    assert len(shingles("two words", 5)) == 1  # shorter than a shingle: one shingle of everything
    assert len(shingles("  ...  ", 5)) == 0


def test_signature_estimates_jaccard():
    docs, dup = planted_corpus(30, 30, 0, seed=3, edits=6)
    sig = MinHasher(num_perm=256, shingle_size=5, seed=7).signatures(docs)
    errors = [abs(jaccard_estimate(sig[c], sig[o]) - exact_jaccard(docs[c], docs[o])) for c, o in dup.items()]
    # Standard error of the estimate is sqrt(J(1-J)/256) <= 0.031; the mean error is far below it.
    assert np.mean(errors) < 0.03 and max(errors) < 0.12
    # Unrelated documents share (almost) no shingles, hence (almost) no signature values.
    assert jaccard_estimate(sig[0], sig[1]) < 0.05


def test_signatures_are_deterministic_and_batch_independent():
    docs, _ = planted_corpus(12, 0, 0, seed=1)
    h = MinHasher(num_perm=64, shingle_size=3, seed=5)
    together = h.signatures(docs)
    one_by_one = np.concatenate([h.signatures([d]) for d in docs])
    np.testing.assert_array_equal(together, one_by_one)
    np.testing.assert_array_equal(together, MinHasher(num_perm=64, shingle_size=3, seed=5).signatures(docs))
    assert (h.signatures([""]) == np.iinfo(np.uint32).max).all()
    assert together.shape == (12, 64) and together.dtype == np.uint32


def test_optimal_bands_balances_errors():
    b, r = optimal_bands(0.8, 128)
    assert b * r <= 128
    # The S-curve rises through the threshold: rare collisions well below, near-certain well above.
    assert collision_probability(0.5, b, r) < 0.05 and collision_probability(0.95, b, r) > 0.99
    b2, r2 = optimal_bands(0.5, 128)
    assert r2 < r  # a lower threshold needs fewer rows per band


def test_lsh_clusters_keep_the_first_and_respect_the_threshold():
    docs, dup = planted_corpus(200, 30, 15, seed=2, edits=1)
    sig = MinHasher(128, 5).signatures(docs)
    lsh = LSHDeduplicator(16, 8, 0.7, lambda g: sig[g])
    keys = lsh.band_keys(sig)
    for i in range(len(docs)):
        lsh.add(i, sig[i], keys[i])
    found = lsh.duplicates()
    assert set(found) == set(dup)  # every planted copy, nothing else
    assert all(found[c] == o for c, o in dup.items())  # mapped to its original, the first in order


def test_lsh_verifies_candidates_against_threshold():
    docs, dup = planted_corpus(5, 5, 0, seed=4, edits=25)  # copies at Jaccard ≈ 0.3
    sig = MinHasher(128, 5).signatures(docs)
    lsh = LSHDeduplicator(128, 1, 0.8, lambda g: sig[g])  # one row per band: every shared value is a candidate
    keys = lsh.band_keys(sig)
    for i in range(len(docs)):
        lsh.add(i, sig[i], keys[i])
    assert lsh.duplicates() == {}
    loose = LSHDeduplicator(128, 1, 0.1, lambda g: sig[g])
    for i in range(len(docs)):
        loose.add(i, sig[i], keys[i])
    assert set(loose.duplicates()) == set(dup)


@pytest.mark.parametrize("bad", [dict(bands=4), dict(bands=20, rows=8), dict(threshold=0.0)])
def test_minhash_config_errors(bad):
    from pydantic import ValidationError

    from mm_llama.curate.config import MinHashConfig

    with pytest.raises(ValidationError):
        MinHashConfig(**bad)

"""MinHash near-duplicate removal: mm_llama.curate against datasketch on the same corpus and settings.

One process each (documents/s per core), same shingles (word 5-grams), num_perm, bands × rows and
threshold; reports throughput of signatures + LSH and the recall of planted near-duplicates.

    python bench/curate.py [--docs 5000] [--near 500] [--num-perm 128] [--threshold 0.8]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mm_llama.curate.minhash import LSHDeduplicator, MinHasher, collision_probability, optimal_bands, shingles, words
from mm_llama.curate.synthetic import planted_corpus


def run_ours(docs, num_perm, bands, rows, threshold):
    t0 = time.perf_counter()
    sig = MinHasher(num_perm, 5, seed=1).signatures(docs)
    t1 = time.perf_counter()
    lsh = LSHDeduplicator(bands, rows, threshold, lambda g: sig[g])
    keys = lsh.band_keys(sig)
    for i in range(len(docs)):
        lsh.add(i, sig[i], keys[i])
    found = lsh.duplicates()
    return found, t1 - t0, time.perf_counter() - t0


def run_datasketch(docs, num_perm, bands, rows, threshold):
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    hashes = []
    for text in docs:
        w = words(text)
        grams = {" ".join(w[i : i + 5]).encode() for i in range(max(1, len(w) - 4))}
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(list(grams))
        hashes.append(m)
    t1 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, rows))
    found = {}
    for i, m in enumerate(hashes):
        # Same decision rule as ours: first candidate at or above the threshold by estimated Jaccard.
        match = [int(c) for c in lsh.query(m) if m.jaccard(hashes[int(c)]) >= threshold]
        if match:
            found[i] = min(match)
        else:
            lsh.insert(str(i), m)
    return found, t1 - t0, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--docs", type=int, default=5000)
    p.add_argument("--near", type=int, default=500)
    p.add_argument("--words", type=int, default=300)
    p.add_argument("--edits", type=int, default=2)
    p.add_argument("--num-perm", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.8)
    args = p.parse_args()
    docs, dup = planted_corpus(args.docs, args.near, 0, seed=0, n_words=args.words, edits=args.edits)
    bands, rows = optimal_bands(args.threshold, args.num_perm)
    out = {"documents": len(docs), "planted_near_duplicates": len(dup), "num_perm": args.num_perm,
           "bands": bands, "rows": rows, "threshold": args.threshold, "shingle": 5}
    # The recall banded LSH promises on these pairs: the S-curve at each pair's exact Jaccard.
    exact = []
    for c, o in dup.items():
        a, b = set(shingles(docs[c], 5).tolist()), set(shingles(docs[o], 5).tolist())
        exact.append(len(a & b) / len(a | b))
    out["expected_recall"] = round(float(np.mean(collision_probability(np.array(exact), bands, rows))), 4)
    for name, fn in (("mm_llama", run_ours), ("datasketch", run_datasketch)):
        found, t_sig, t_all = fn(docs, args.num_perm, bands, rows, args.threshold)
        hits = sum(1 for c, o in dup.items() if c in found)
        out[name] = {"docs_per_s": round(len(docs) / t_all, 1), "signature_docs_per_s": round(len(docs) / t_sig, 1),
                     "recall": round(hits / len(dup), 4), "false_removals": sum(1 for c in found if c not in dup)}
    out["speedup"] = round(out["mm_llama"]["docs_per_s"] / out["datasketch"]["docs_per_s"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    np.seterr(over="ignore")
    main()

"""The curation run: three streaming passes, each resumable per shard.

1. signatures (parallel over shards): per document its URL and date, MinHash signature, line
   hashes and token histogram (text) or SHA-256 and pHash (image-text), written to `work_dir`;
2. decisions (one process, streaming the signature files in corpus order): URL dedup keeping the
   newest, MinHash-LSH clusters keeping the first, the frequent lines of each bucket of documents,
   the corpus token distribution; one small decision file per shard;
3. apply (parallel over shards): drop the decided duplicates, strip frequent lines, run the
   heuristic, language, quality and caption filters, tag domains, write the output shards.

Inputs are only read. Every step records what it removed and why in `OUTPUT/reports/`, and
`OUTPUT/report.json` totals them. A pass skips every shard whose result file already exists.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .config import CurateConfig
from .domains import DomainTagger
from .engine import map_shards
from .heuristics import HeuristicFilter, token_histogram
from .images import NearDuplicateIndex, build_similarity, decode_image, exact_hash, perceptual_hash
from .language import LanguageIdentifier
from .lines import document_line_hashes, frequent_lines, remove_lines
from .minhash import LSHDeduplicator, MinHasher, optimal_bands, shingles, words
from .shards import ShardWriter, expand_inputs, read_shard, write_json
from .urls import NewestPerUrl

log = logging.getLogger("mm_llama.curate")
SNIPPET = 200


@dataclass(frozen=True)
class Shard:
    index: int
    path: str

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass(frozen=True)
class Layout:
    """Where each pass writes."""

    out: Path
    work: Path

    def sig(self, shard: Shard, part: str) -> Path:
        return self.work / "signatures" / f"{shard.name}.{part}"

    def decision(self, shard: Shard) -> Path:
        return self.work / "decisions" / f"{shard.name}.json"

    def bucket(self, b: int) -> Path:
        return self.work / "lines" / f"bucket_{b:06d}.npy"

    @property
    def corpus_tokens(self) -> Path:
        return self.work / "corpus_tokens.npy"

    @property
    def reports(self) -> Path:
        return self.out / "reports"

    def shard_report(self, shard: Shard) -> Path:
        return self.reports / "shards" / f"{shard.name}.json"


def layout(config: CurateConfig) -> Layout:
    out = Path(config.output).expanduser().resolve()
    work = Path(config.work_dir).expanduser().resolve() if config.work_dir else out / "_work"
    return Layout(out, work)


def _snippet(text: str) -> str:
    return text[:SNIPPET] + ("…" if len(text) > SNIPPET else "")


class Tally:
    """Counts per rule plus the first few examples of each, for a report."""

    def __init__(self, examples: int):
        self.limit = examples
        self.removed: Counter = Counter()
        self.examples: dict[str, list] = {}

    def add(self, rule: str, shard: str, key: str, why: str, text: str = "") -> None:
        self.removed[rule] += 1
        bucket = self.examples.setdefault(rule, [])
        if len(bucket) < self.limit:
            bucket.append({"shard": shard, "key": key, "why": why, "text": _snippet(text)})


# ---------------------------------------------------------------------------------------------
# Pass 1: signatures


def _signature_text(task) -> str:
    config, lay, shard = task
    meta_path = lay.sig(shard, "json")
    if meta_path.exists():
        return "skipped"
    mh = config.minhash
    hasher = MinHasher(mh.num_perm, mh.shingle_size, mh.seed)
    keys, urls, dates, grams, line_hashes = [], [], [], [], []
    buckets = config.heuristics.token_kl.buckets
    tokens = np.zeros(buckets, dtype=np.int64)
    for s in read_shard(shard.path):
        keys.append(s.key)
        urls.append(s.meta.get("url") if isinstance(s.meta.get("url"), str) else None)
        dates.append(s.meta.get("date"))
        grams.append(shingles(s.text, mh.shingle_size) if mh.enabled else np.empty(0, dtype=np.uint64))
        line_hashes.append(document_line_hashes(s.text) if config.lines.enabled else np.empty(0, dtype=np.int64))
        if config.heuristics.token_kl.max_kl is not None:
            tokens += token_histogram(words(s.text), buckets)
    sig = hasher.signatures_of(grams) if mh.enabled else np.zeros((len(keys), 0), dtype=np.uint32)
    lay.sig(shard, "json").parent.mkdir(parents=True, exist_ok=True)
    np.save(lay.sig(shard, "sig.npy"), sig)
    np.save(lay.sig(shard, "lines.npy"), np.concatenate(line_hashes) if line_hashes else np.empty(0, np.int64))
    np.save(lay.sig(shard, "line_offsets.npy"), np.cumsum([0] + [len(h) for h in line_hashes]))
    np.save(lay.sig(shard, "tokens.npy"), tokens)
    write_json(meta_path, {"keys": keys, "urls": urls, "dates": dates, "has_words": [bool(len(g)) for g in grams]})
    return "done"


def _signature_images(task) -> str:
    config, lay, shard = task
    meta_path = lay.sig(shard, "json")
    if meta_path.exists():
        return "skipped"
    keys, sha, phash, unreadable = [], [], [], []
    for s in read_shard(shard.path):
        keys.append(s.key)
        ext = s.image_ext
        if ext is None:
            raise ValueError(f"{shard.path}: sample '{s.key}' has no image member ({', '.join(('jpg', 'png', 'webp'))})")
        data = s.members[ext]
        sha.append(exact_hash(data))
        try:
            phash.append(format(perceptual_hash(decode_image(data), config.images.hash_size), "x"))
            unreadable.append(False)
        except Exception as e:  # PIL raises many types for corrupt files
            log.warning("%s: sample '%s': unreadable image: %s", shard.path, s.key, e)
            phash.append("")
            unreadable.append(True)
    write_json(meta_path, {"keys": keys, "sha256": sha, "phash": phash, "unreadable": unreadable})
    return "done"


# ---------------------------------------------------------------------------------------------
# Pass 2: decisions


def _read_meta(lay: Layout, shards: list[Shard]) -> tuple[list[dict], np.ndarray]:
    metas = [json.loads(lay.sig(s, "json").read_text()) for s in shards]
    offsets = np.cumsum([0] + [len(m["keys"]) for m in metas])
    return metas, offsets


def _shard_of(offsets: np.ndarray, gid: int) -> int:
    """The shard holding corpus-wide document id `gid` (`offsets[i]` = first id of shard i)."""
    return int(np.searchsorted(offsets, gid, side="right") - 1)


def _decide_text(config: CurateConfig, lay: Layout, shards: list[Shard]) -> dict:
    metas, offsets = _read_meta(lay, shards)
    where = lambda gid: _shard_of(offsets, gid)  # noqa: E731
    key_of = lambda gid: metas[where(gid)]["keys"][gid - offsets[where(gid)]]  # noqa: E731
    removed: dict[int, tuple[str, str]] = {}
    report: dict = {"documents": int(offsets[-1])}

    if config.url_dedup.enabled:
        urls = NewestPerUrl()
        for i, m in enumerate(metas):
            for j, (u, d) in enumerate(zip(m["urls"], m["dates"])):
                urls.add(int(offsets[i]) + j, u, d)
        for gid, kept in urls.losers().items():
            removed[gid] = ("url_duplicate", f"same URL as newer '{key_of(kept)}' ({shards[where(kept)].name})")
        report["url_duplicate"] = sum(1 for r in removed.values() if r[0] == "url_duplicate")

    if config.minhash.enabled:
        mh = config.minhash
        bands, rows = (mh.bands, mh.rows) if mh.bands else optimal_bands(mh.threshold, mh.num_perm)
        sigs = [np.load(lay.sig(s, "sig.npy"), mmap_mode="r") for s in shards]
        signature = lambda gid: sigs[where(gid)][gid - offsets[where(gid)]]  # noqa: E731
        lsh = LSHDeduplicator(bands, rows, mh.threshold, signature, seed=mh.seed)
        for i, m in enumerate(metas):
            sig = np.asarray(sigs[i])
            band_keys = lsh.band_keys(sig)
            for j in range(len(m["keys"])):
                gid = int(offsets[i]) + j
                if gid not in removed and m["has_words"][j]:
                    lsh.add(gid, sig[j], band_keys[j])
        clusters: dict[int, list[int]] = {}
        for gid, root in sorted(lsh.duplicates().items()):
            clusters.setdefault(root, []).append(gid)
            removed[gid] = ("minhash_duplicate", f"near-duplicate of '{key_of(root)}' ({shards[where(root)].name})")
        lay.reports.mkdir(parents=True, exist_ok=True)
        with open(lay.reports / "minhash_clusters.jsonl", "w") as f:
            for root, members in sorted(clusters.items()):
                rows_ = [
                    {"shard": shards[where(g)].name, "key": key_of(g), "jaccard": round(float(np.mean(signature(g) == signature(root))), 4)}
                    for g in members
                ]
                f.write(json.dumps({"kept": {"shard": shards[where(root)].name, "key": key_of(root)}, "removed": rows_}) + "\n")
        report.update(
            minhash_duplicate=sum(len(v) for v in clusters.values()),
            minhash_clusters=len(clusters),
            minhash_bands=bands,
            minhash_rows=rows,
        )

    if config.lines.enabled:
        m_docs, current, batch, n_frequent = config.lines.bucket_docs, 0, [], 0
        for i, s in enumerate(shards):
            hashes, cut = np.load(lay.sig(s, "lines.npy")), np.load(lay.sig(s, "line_offsets.npy"))
            for j in range(len(cut) - 1):
                gid = int(offsets[i]) + j
                if gid // m_docs != current:
                    n_frequent += _save_bucket(lay, current, batch, config.lines.max_repeats)
                    current, batch = gid // m_docs, []
                if gid not in removed:
                    batch.append(hashes[cut[j] : cut[j + 1]])
        n_frequent += _save_bucket(lay, current, batch, config.lines.max_repeats)
        report["frequent_lines"] = n_frequent

    if config.heuristics.token_kl.max_kl is not None:
        np.save(lay.corpus_tokens, sum(np.load(lay.sig(s, "tokens.npy")) for s in shards))

    for i, s in enumerate(shards):
        mine = {gid - int(offsets[i]): r for gid, r in removed.items() if offsets[i] <= gid < offsets[i + 1]}
        write_json(lay.decision(s), {"offset": int(offsets[i]), "removed": {str(k): list(v) for k, v in sorted(mine.items())}})
    return report


def _save_bucket(lay: Layout, b: int, batch: list[np.ndarray], max_repeats: int) -> int:
    frequent = frequent_lines(batch, max_repeats)
    lay.bucket(b).parent.mkdir(parents=True, exist_ok=True)
    np.save(lay.bucket(b), frequent)
    return len(frequent)


def _decide_images(config: CurateConfig, lay: Layout, shards: list[Shard]) -> dict:
    metas, offsets = _read_meta(lay, shards)
    ic = config.images
    removed: dict[int, tuple[str, str]] = {}
    first_sha: dict[str, int] = {}
    near = NearDuplicateIndex(ic.hash_size**2, ic.max_distance)
    key_of = lambda gid: metas[_shard_of(offsets, gid)]["keys"][gid - offsets[_shard_of(offsets, gid)]]  # noqa: E731
    for i, m in enumerate(metas):
        for j, (sha, ph, bad) in enumerate(zip(m["sha256"], m["phash"], m["unreadable"])):
            gid = int(offsets[i]) + j
            if bad:
                removed[gid] = ("unreadable_image", "the image could not be decoded")
                continue
            if ic.exact and sha in first_sha:
                removed[gid] = ("image_exact_duplicate", f"same bytes as '{key_of(first_sha[sha])}'")
                continue
            first_sha.setdefault(sha, gid)
            if ic.near:
                other = near.add(gid, int(ph, 16))
                if other is not None:
                    removed[gid] = ("image_near_duplicate", f"perceptual hash within {ic.max_distance} bits of '{key_of(other)}'")
    for i, s in enumerate(shards):
        mine = {gid - int(offsets[i]): r for gid, r in removed.items() if offsets[i] <= gid < offsets[i + 1]}
        write_json(lay.decision(s), {"offset": int(offsets[i]), "removed": {str(k): list(v) for k, v in sorted(mine.items())}})
    return {"images": int(offsets[-1]), **Counter(r[0] for r in removed.values())}


# ---------------------------------------------------------------------------------------------
# Pass 3: apply


class _Outputs:
    """One output shard per input shard, or one per domain under `OUT/<domain>/`."""

    def __init__(self, lay: Layout, shard: Shard, split: bool):
        self.lay, self.shard, self.split = lay, shard, split
        self.writers: dict[str, ShardWriter] = {}
        if not split:
            self.writers[""] = ShardWriter(lay.out / shard.name)

    def write(self, sample, domain: str | None) -> None:
        slot = domain if self.split and domain else ""
        if slot not in self.writers:
            self.writers[slot] = ShardWriter(self.lay.out / slot / self.shard.name)
        self.writers[slot].write(sample)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def _apply_text(task) -> dict:
    config, lay, shard, single_thread = task
    if lay.shard_report(shard).exists():
        return json.loads(lay.shard_report(shard).read_text())
    if single_thread:
        import torch

        torch.set_num_threads(1)
    decision = json.loads(lay.decision(shard).read_text())
    dedup, offset = decision["removed"], decision["offset"]
    corpus = np.load(lay.corpus_tokens) if config.heuristics.token_kl.max_kl is not None else None
    heuristics = HeuristicFilter(config.heuristics, corpus)
    lc = config.language
    langid = LanguageIdentifier(lc.languages, lc.min_confidence, lc.max_chars) if lc.enabled else None
    tagger = DomainTagger(config.domains) if config.domains.enabled else None
    scorer = None
    if config.quality.scorer is not None:
        from .quality import build_scorer

        scorer = build_scorer(config.quality)
    tally, lines_tally = Tally(config.examples_per_rule), Tally(config.examples_per_rule)
    domains, languages = Counter(), Counter()
    buckets: dict[int, np.ndarray] = {}
    out = _Outputs(lay, shard, config.domains.split_output)
    pending: list = []
    n_in = n_out = 0

    def flush():
        nonlocal n_out
        scores = scorer.score([s.text for s in pending]) if scorer is not None and pending else [None] * len(pending)
        q = config.quality
        for s, score in zip(pending, scores):
            if score is not None:
                score = float(score)
                s.meta["quality"] = score
                if (q.min_score is not None and score < q.min_score) or (q.max_score is not None and score > q.max_score):
                    tally.add("quality", shard.name, s.key, f"score {score:.4g} outside [{q.min_score}, {q.max_score}]", s.text)
                    continue
            domain = tagger.tag(s.text, s.meta.get("lang"), s.meta) if tagger is not None else None
            if domain is not None:
                s.meta["domain"] = domain
                domains[domain] += 1
            out.write(s, domain)
            n_out += 1
        pending.clear()

    for j, s in enumerate(read_shard(shard.path)):
        n_in += 1
        if str(j) in dedup:
            rule, why = dedup[str(j)]
            tally.add(rule, shard.name, s.key, why, s.text)
            continue
        if config.lines.enabled:
            b = (offset + j) // config.lines.bucket_docs
            if b not in buckets:
                buckets[b] = np.load(lay.bucket(b))
            s.text, dropped = remove_lines(s.text, buckets[b])
            for line in dropped:
                lines_tally.add("frequent_line", shard.name, s.key, "line in too many documents of its bucket", line)
            if dropped and not s.text.strip():
                tally.add("lines_emptied", shard.name, s.key, "nothing left after line de-duplication", "\n".join(dropped))
                continue
        rejected = heuristics.check(s.text)
        if rejected is not None:
            tally.add(rejected[0], shard.name, s.key, rejected[1], s.text)
            continue
        if langid is not None:
            lang, conf = langid.identify(s.text)
            s.meta["lang"], s.meta["lang_score"] = lang, round(conf, 4)
            languages[lang] += 1
            if lc.keep is not None and lang not in lc.keep:
                tally.add("language", shard.name, s.key, f"language {lang} not in {lc.keep}", s.text)
                continue
        pending.append(s)
        if len(pending) >= 64:
            flush()
    flush()
    out.close()
    report = {
        "shard": shard.name,
        "documents_in": n_in,
        "documents_out": n_out,
        "removed": dict(tally.removed),
        "examples": tally.examples,
        "lines_removed": lines_tally.removed["frequent_line"],
        "line_examples": lines_tally.examples.get("frequent_line", []),
        "domains": dict(domains),
        "languages": dict(languages),
    }
    write_json(lay.shard_report(shard), report)
    return report


def _apply_images(task) -> dict:
    config, lay, shard, single_thread = task
    if lay.shard_report(shard).exists():
        return json.loads(lay.shard_report(shard).read_text())
    if single_thread:
        import torch

        torch.set_num_threads(1)
    ic = config.images
    dedup = json.loads(lay.decision(shard).read_text())["removed"]
    langid = None
    if ic.caption_languages is not None:
        langid = LanguageIdentifier(config.language.languages, config.language.min_confidence, config.language.max_chars)
    clip = build_similarity(ic.clip)
    tally, languages = Tally(config.examples_per_rule), Counter()
    out = _Outputs(lay, shard, split=False)
    pending: list = []
    n_in = n_out = 0

    def flush():
        nonlocal n_out
        sims = clip.similarity([decode_image(s.members[s.image_ext]) for s in pending], [s.text for s in pending]) if clip and pending else [None] * len(pending)
        for s, sim in zip(pending, sims):
            if sim is not None:
                s.meta["clip_similarity"] = round(float(sim), 4)
                if sim < ic.clip.min_similarity:
                    tally.add("clip_similarity", shard.name, s.key, f"image-text similarity {sim:.3f} < {ic.clip.min_similarity}", s.text)
                    continue
            out.write(s, None)
            n_out += 1
        pending.clear()

    for j, s in enumerate(read_shard(shard.path)):
        n_in += 1
        if str(j) in dedup:
            rule, why = dedup[str(j)]
            tally.add(rule, shard.name, s.key, why, s.text)
            continue
        n_words = len(words(s.text))
        if n_words < ic.min_caption_words or (ic.max_caption_words is not None and n_words > ic.max_caption_words):
            tally.add("caption_length", shard.name, s.key, f"{n_words} words outside [{ic.min_caption_words}, {ic.max_caption_words}]", s.text)
            continue
        if langid is not None:
            lang, conf = langid.identify(s.text)
            s.meta["lang"] = lang
            languages[lang] += 1
            if lang not in ic.caption_languages:
                tally.add("caption_language", shard.name, s.key, f"caption language {lang} not in {ic.caption_languages}", s.text)
                continue
        pending.append(s)
        if len(pending) >= ic.clip.batch_size:
            flush()
    flush()
    out.close()
    report = {
        "shard": shard.name,
        "documents_in": n_in,
        "documents_out": n_out,
        "removed": dict(tally.removed),
        "examples": tally.examples,
        "languages": dict(languages),
    }
    write_json(lay.shard_report(shard), report)
    return report


# ---------------------------------------------------------------------------------------------


def _merge(reports: list[dict], examples: int) -> dict:
    total: dict = {"documents_in": 0, "documents_out": 0, "removed": Counter(), "examples": {}, "domains": Counter(), "languages": Counter()}
    lines, line_examples = 0, []
    for r in reports:
        total["documents_in"] += r["documents_in"]
        total["documents_out"] += r["documents_out"]
        total["removed"].update(r["removed"])
        total["domains"].update(r.get("domains", {}))
        total["languages"].update(r.get("languages", {}))
        for rule, ex in r["examples"].items():
            total["examples"].setdefault(rule, []).extend(ex[: max(0, examples - len(total["examples"].get(rule, [])))])
        lines += r.get("lines_removed", 0)
        line_examples.extend(r.get("line_examples", [])[: max(0, examples - len(line_examples))])
    total.update(removed=dict(total["removed"]), domains=dict(total["domains"]), languages=dict(total["languages"]))
    if any("lines_removed" in r for r in reports):
        total.update(lines_removed=lines, line_examples=line_examples)
    return total


def _check_filters(config: CurateConfig) -> None:
    """Build every filter once in this process, so config errors surface before any work."""
    lc = config.language
    if config.kind == "text":
        if lc.enabled:
            LanguageIdentifier(lc.languages, lc.min_confidence, lc.max_chars)
            if lc.keep is not None:
                from .language import to_languages

                to_languages(lc.keep, "language.keep", at_least=1)
        if config.domains.enabled:
            DomainTagger(config.domains)
        HeuristicFilter(config.heuristics, np.zeros(1) if config.heuristics.token_kl.max_kl else None)
        if config.quality.scorer not in (None, "perplexity"):
            from .quality import build_scorer

            build_scorer(config.quality)
    elif config.images.caption_languages is not None:
        from .language import to_languages

        LanguageIdentifier(lc.languages, lc.min_confidence, lc.max_chars)
        to_languages(config.images.caption_languages, "images.caption_languages", at_least=1)


_RUNTIME_KEYS = ("engine", "workers", "dask_address", "examples_per_rule")


def _check_resume(config: CurateConfig, lay: Layout) -> None:
    """Resuming reuses finished shards, which is only right for the same settings."""
    settings = config.model_dump(mode="json", exclude=set(_RUNTIME_KEYS))
    path = lay.work / "config.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise ConfigError(
                f"{lay.work} holds a run with other settings ({', '.join(changed)} differ); "
                "use a new output or work_dir, or remove it to start over"
            )
    lay.out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


def curate(config: CurateConfig) -> dict:
    """Run every configured step over `config.inputs` into `config.output`; returns the report."""
    shards = [Shard(i, str(p)) for i, p in enumerate(expand_inputs(config.inputs))]
    lay = layout(config)
    for s in shards:
        if Path(s.path).parent == lay.out or lay.out in Path(s.path).parents or lay.work in Path(s.path).parents:
            raise ConfigError(f"output: {lay.out} holds the input shard {s.path}; curation never writes over its inputs")
    _check_filters(config)
    _check_resume(config, lay)
    text = config.kind == "text"
    multi = config.engine == "dask" or (config.workers or 2) > 1

    log.info("curate: signatures of %d shards", len(shards))
    map_shards(_signature_text if text else _signature_images, [(config, lay, s) for s in shards], config)

    done = lay.work / "decisions.json"
    if done.exists():
        dedup = json.loads(done.read_text())
    else:
        log.info("curate: global de-duplication decisions")
        dedup = (_decide_text if text else _decide_images)(config, lay, shards)
        write_json(lay.reports / "dedup.json", dedup)
        write_json(done, dedup)

    log.info("curate: filtering and writing %d shards", len(shards))
    tasks = [(config, lay, s, multi) for s in shards]
    reports = map_shards(_apply_text if text else _apply_images, tasks, config)
    report = {"name": config.name, "kind": config.kind, "shards": len(shards), "dedup": dedup, **_merge(reports, config.examples_per_rule)}
    write_json(lay.out / "report.json", report)
    return report

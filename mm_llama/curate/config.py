"""The `mm-llama data curate` config: one section per curation step (SPEC §2.1, Llama 3 §3.1.1)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DOMAINS = ("general", "math_reasoning", "code", "multilingual")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UrlDedupConfig(_Strict):
    """URL-level de-duplication: one document per normalised URL, the newest by its `date`."""

    enabled: bool = True


class MinHashConfig(_Strict):
    """Document-level near-duplicate removal with MinHash signatures and banded LSH.

    `bands` × `rows` hashes are used for LSH; when both are left out they are chosen from
    `threshold` to balance false positives and false negatives. A candidate pair is merged
    only when its estimated Jaccard similarity reaches `threshold`.
    """

    enabled: bool = True
    num_perm: int = Field(128, ge=2, le=4096)
    shingle_size: int = Field(5, ge=1)
    threshold: float = Field(0.8, gt=0.0, le=1.0)
    bands: int | None = Field(None, ge=1)
    rows: int | None = Field(None, ge=1)
    seed: int = 1

    @model_validator(mode="after")
    def _check_bands(self) -> "MinHashConfig":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both minhash.bands and minhash.rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands × rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


class LineDedupConfig(_Strict):
    """ccNet-style line de-duplication: drop lines found in more than `max_repeats` documents
    of each bucket of `bucket_docs` consecutive documents (the paper: 6 in 30M)."""

    enabled: bool = True
    max_repeats: int = Field(6, ge=1)
    bucket_docs: int = Field(30_000_000, ge=1)


class DupNgramConfig(_Strict):
    """Duplicated n-gram coverage: the fraction of word characters inside n-grams that occur
    more than once in the document, with a ceiling per n (defaults from Gopher's rules)."""

    enabled: bool = True
    max_fraction: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


class WordListConfig(_Strict):
    """Counts of words from a user-supplied list (one word or phrase per line), e.g. dirty words."""

    path: str | None = None
    max_count: int | None = Field(None, ge=0)
    max_fraction: float | None = Field(None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> "WordListConfig":
        if self.path is not None and self.max_count is None and self.max_fraction is None:
            raise ValueError("heuristics.word_list.path is set but neither max_count nor max_fraction is")
        return self


class TokenKLConfig(_Strict):
    """Token-distribution outliers: KL(document ‖ corpus) over hashed word tokens above `max_kl`,
    for documents of at least `min_tokens` words (a short document's distribution is too
    concentrated for its KL to say anything about outlier tokens)."""

    max_kl: float | None = Field(None, gt=0.0)
    min_tokens: int = Field(50, ge=1)
    buckets: int = Field(1 << 16, ge=16)


class HeuristicsConfig(_Strict):
    min_words: int = Field(0, ge=0)
    dup_ngrams: DupNgramConfig = DupNgramConfig()
    word_list: WordListConfig = WordListConfig()
    token_kl: TokenKLConfig = TokenKLConfig()


class LanguageConfig(_Strict):
    """Language identification with lingua (its models ship in the wheel).

    `languages`: ISO 639-1 codes the detector chooses among, or `all` (75 languages).
    `keep`: codes to keep; others are removed (None keeps every language).
    """

    enabled: bool = True
    languages: list[str] | Literal["all"] = ["en", "de", "fr", "es", "it", "pt", "nl", "ru", "zh", "ja", "hi", "ar"]
    keep: list[str] | None = None
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    max_chars: int = Field(2000, ge=1)


class QualityConfig(_Strict):
    """A pluggable quality scorer: `perplexity` (the project's LM; options `model`, `tokenizer`,
    `max_tokens`, `batch_size`) or `package.module:factory` returning an object with
    `score(texts) -> list[float]`. Documents scoring outside [min_score, max_score] are removed."""

    scorer: str | None = None
    options: dict = {}
    min_score: float | None = None
    max_score: float | None = None


class DomainConfig(_Strict):
    """Domain tags for the engine's mix (general / math_reasoning / code / multilingual)."""

    enabled: bool = True
    tagger: str = "rules"
    options: dict = {}
    trust_metadata: bool = True
    primary_languages: list[str] = ["en"]
    split_output: bool = False


class ClipConfig(_Strict):
    """Image-text similarity: `open_clip` (options `model`, `checkpoint`, `model_config`) or
    `package.module:factory` returning an object with `similarity(images, captions) -> list[float]`."""

    scorer: str | None = None
    options: dict = {}
    min_similarity: float = 0.0
    batch_size: int = Field(32, ge=1)


class ImageConfig(_Strict):
    """Image-text pairs: exact (SHA-256) and perceptual-hash near-duplicate images, caption filters."""

    exact: bool = True
    near: bool = True
    hash_size: int = Field(8, ge=4, le=16)
    max_distance: int = Field(4, ge=0)
    min_caption_words: int = Field(1, ge=0)
    max_caption_words: int | None = Field(None, ge=1)
    caption_languages: list[str] | None = None
    clip: ClipConfig = ClipConfig()


class CurateConfig(_Strict):
    """One curation run: inputs (paths, globs or brace patterns) → `output`, never in place."""

    name: str = "curate"
    kind: Literal["text", "image_text"] = "text"
    inputs: list[str]
    output: str
    work_dir: str | None = None
    engine: Literal["local", "dask"] = "local"
    workers: int | None = Field(None, ge=1)
    dask_address: str | None = None
    examples_per_rule: int = Field(5, ge=0)
    url_dedup: UrlDedupConfig = UrlDedupConfig()
    minhash: MinHashConfig = MinHashConfig()
    lines: LineDedupConfig = LineDedupConfig()
    heuristics: HeuristicsConfig = HeuristicsConfig()
    language: LanguageConfig = LanguageConfig()
    quality: QualityConfig = QualityConfig()
    domains: DomainConfig = DomainConfig()
    images: ImageConfig = ImageConfig()

    @model_validator(mode="before")
    @classmethod
    def _one_input(cls, data):
        if isinstance(data, dict) and isinstance(data.get("inputs"), str):
            data = {**data, "inputs": [data["inputs"]]}
        return data

    @model_validator(mode="after")
    def _check(self) -> "CurateConfig":
        if not self.inputs:
            raise ValueError("inputs is empty")
        if self.images.max_distance >= self.images.hash_size**2:
            raise ValueError("images.max_distance must be below the hash length (hash_size²)")
        return self

"""Pre-training data curation (`mm-llama data curate`, Llama 3 §3.1.1): URL, MinHash and line
de-duplication, heuristic, language and quality filters, domain tags, image-text pair filters."""
from .config import DOMAINS, CurateConfig
from .domains import DomainTagger, RuleDomainTagger
from .heuristics import HeuristicFilter, duplicated_ngram_fraction, kl_from_corpus
from .images import NearDuplicateIndex, OpenClipSimilarity, perceptual_hash
from .language import LanguageIdentifier
from .lines import frequent_lines, remove_lines
from .minhash import LSHDeduplicator, MinHasher, jaccard_estimate, optimal_bands
from .runner import curate
from .urls import NewestPerUrl, normalize_url

__all__ = [
    "DOMAINS",
    "CurateConfig",
    "DomainTagger",
    "HeuristicFilter",
    "LSHDeduplicator",
    "LanguageIdentifier",
    "MinHasher",
    "NearDuplicateIndex",
    "NewestPerUrl",
    "OpenClipSimilarity",
    "RuleDomainTagger",
    "curate",
    "duplicated_ngram_fraction",
    "frequent_lines",
    "jaccard_estimate",
    "kl_from_corpus",
    "normalize_url",
    "optimal_bands",
    "perceptual_hash",
    "remove_lines",
]

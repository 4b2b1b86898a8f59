"""Domain tags for the data mix (Llama 3 §3.1.2: ~50% general, 25% math & reasoning, 17% code,
8% multilingual). The tag goes into each sample's json `domain`, which the engine's mix can weight.

The built-in tagger is rule-based (the paper's DistilRoBERTa classifiers are not public); a
`package.module:factory` plug-in returning an object with `tag(text, language, meta) -> str` can
replace it.
"""
from __future__ import annotations

import re

from ..config import ConfigError
from .config import DOMAINS, DomainConfig
from .plugins import load_plugin

_CODE_LINE = re.compile(
    r"""(^\s*(def|class|import|from\s+\S+\s+import|return|for|while|if|elif|else|try|except|function|const|let|var|
          public|private|static|package|func|fn|struct|impl|use|\#include|\#define|SELECT|INSERT|@\w+)\b)
       |([;{}]\s*$)|(\)\s*:\s*$)|(=>|->|::|==|!=|\+\+|&&|\|\|)|(^\s*(//|/\*|\*\s))""",
    re.VERBOSE,
)
_MATH = re.compile(
    r"""(\\(frac|sum|int|sqrt|alpha|beta|theta|pi|cdot|times|leq|geq|begin|end|mathbb|lim|infty)\b)
       |(\$[^$\n]+\$)|(\d\s*[-+*/^=<>]\s*\d)|(\b[a-z]\s*[=^]\s*\d)
       |\b(theorem|lemma|proof|equation|solve|integral|derivative|probability|polynomial|prime|
           integer|compute|calculate|sum|product|fraction|matrix)\b""",
    re.VERBOSE | re.IGNORECASE,
)


class RuleDomainTagger:
    """Code when enough non-blank lines look like source code, math & reasoning when math signals
    are dense enough per word, multilingual when the language is not a primary one, else general."""

    def __init__(self, primary_languages=("en",), code_min_fraction: float = 0.3, math_min_density: float = 0.05):
        self.primary = {c.lower() for c in primary_languages}
        self.code_min_fraction, self.math_min_density = code_min_fraction, math_min_density

    def tag(self, text: str, language: str | None, meta: dict) -> str:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if lines and sum(1 for ln in lines if _CODE_LINE.search(ln)) / len(lines) >= self.code_min_fraction:
            return "code"
        n_words = max(1, len(text.split()))
        if len(_MATH.findall(text)) / n_words >= self.math_min_density:
            return "math_reasoning"
        if language is not None and language != "und" and language not in self.primary:
            return "multilingual"
        return "general"


class DomainTagger:
    """The configured tagger, with the sample's own json `domain` taking precedence if trusted."""

    def __init__(self, config: DomainConfig):
        self.trust_metadata = config.trust_metadata
        if config.tagger == "rules":
            try:
                self.inner = RuleDomainTagger(config.primary_languages, **config.options)
            except TypeError as e:
                raise ConfigError(f"domains.options: {e} (the rules tagger takes code_min_fraction, math_min_density)") from e
        else:
            self.inner = load_plugin(config.tagger, "domains.tagger", config.options)
            if not callable(getattr(self.inner, "tag", None)):
                raise ConfigError(f"domains.tagger: {config.tagger!r} made an object without tag(text, language, meta)")

    def tag(self, text: str, language: str | None, meta: dict) -> str:
        if self.trust_metadata and meta.get("domain") in DOMAINS:
            return meta["domain"]
        domain = self.inner.tag(text, language, meta)
        if domain not in DOMAINS:
            raise ValueError(f"domain tagger returned {domain!r}; expected one of {', '.join(DOMAINS)}")
        return domain

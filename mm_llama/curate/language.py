"""Language identification with lingua (`lingua-language-detector`): its n-gram models ship in
the wheel, so nothing is downloaded at run time. Codes are ISO 639-1 (`en`, `fr`, ...)."""
from __future__ import annotations

from functools import lru_cache

from ..config import ConfigError

UNDETERMINED = "und"


def _lingua():
    try:
        import lingua
    except ImportError as e:  # an optional extra
        raise ConfigError("language identification needs lingua: pip install 'mm_llama[curate]'") from e
    return lingua


def to_languages(codes: list[str] | str, key: str = "language.languages", at_least: int = 2):
    """ISO 639-1 codes (or `all`) → lingua `Language` members; unknown codes name the config key."""
    lingua = _lingua()
    if codes == "all":
        return list(lingua.Language.all())
    out, bad = [], []
    for code in codes:
        try:
            out.append(lingua.Language.from_iso_code_639_1(lingua.IsoCode639_1.from_str(code.lower())))
        except ValueError:
            bad.append(code)
    if bad:
        raise ConfigError(f"{key}: unknown or unsupported ISO 639-1 code(s): {', '.join(bad)}")
    if len(out) < at_least:
        raise ConfigError(f"{key}: give at least {at_least} languages (or 'all')")
    return out


@lru_cache(maxsize=4)
def _detector(codes: tuple[str, ...] | str):
    lingua = _lingua()
    return lingua.LanguageDetectorBuilder.from_languages(*to_languages(list(codes) if codes != "all" else "all")).build()


class LanguageIdentifier:
    """`identify(text) -> (code, confidence)`; `und` when nothing reaches `min_confidence`."""

    def __init__(self, languages: list[str] | str = "all", min_confidence: float = 0.0, max_chars: int = 2000):
        self.codes = tuple(c.lower() for c in languages) if languages != "all" else "all"
        to_languages(list(self.codes) if self.codes != "all" else "all")  # validate early, in the parent process
        self.min_confidence, self.max_chars = min_confidence, max_chars

    def identify(self, text: str) -> tuple[str, float]:
        values = _detector(self.codes).compute_language_confidence_values(text[: self.max_chars])
        if not values or values[0].value <= 0.0 or values[0].value < self.min_confidence:
            return UNDETERMINED, 0.0
        return values[0].language.iso_code_639_1.name.lower(), float(values[0].value)

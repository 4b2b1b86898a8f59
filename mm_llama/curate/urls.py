"""URL-level de-duplication (Llama 3 §3.1.1): one document per URL, keeping the most recent."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit


def normalize_url(url: str) -> str:
    """Same page, same string: scheme, `www.`, fragment, case of the host and a trailing `/` ignored."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower().removeprefix("www.")
    if parts.port:
        host = f"{host}:{parts.port}"
    path = parts.path.rstrip("/") or ""
    return urlunsplit(("", host, path, parts.query, ""))


def timestamp(date) -> float:
    """ISO-8601 date or datetime (or a UNIX time) → seconds; missing or unreadable → -inf (oldest)."""
    if isinstance(date, (int, float)) and not isinstance(date, bool):
        return float(date)
    if not isinstance(date, str) or not date.strip():
        return -math.inf
    try:
        parsed = datetime.fromisoformat(date.strip())
    except ValueError:
        return -math.inf
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


class NewestPerUrl:
    """Streams `(doc_id, url, date)`; afterwards `losers()` maps each superseded document to the
    kept one. Ties keep the earlier document."""

    def __init__(self):
        self.best: dict[str, tuple[float, int]] = {}
        self.seen: list[tuple[int, str]] = []

    def add(self, doc_id: int, url: str | None, date) -> None:
        if not url:
            return
        key = normalize_url(url)
        t = timestamp(date)
        self.seen.append((doc_id, key))
        if key not in self.best or t > self.best[key][0]:
            self.best[key] = (t, doc_id)

    def losers(self) -> dict[int, int]:
        return {d: self.best[k][1] for d, k in self.seen if self.best[k][1] != d}

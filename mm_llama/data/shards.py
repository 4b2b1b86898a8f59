"""Shard lists and reading one shard, with every problem counted instead of hidden.

Text shard schema (WebDataset tar files; members of one sample share the basename `__key__`):

| member            | content                                                                |
|-------------------|------------------------------------------------------------------------|
| `<key>.txt`       | the document, UTF-8 text (required; a source's `text_key` may name another field) |
| `<key>.json`      | optional metadata, a JSON object: `source`, `domain`, `url`, `date`, ... |

Keys hold no dots (WebDataset splits the member name at the first dot). With `text_key: json.text`
the document is the `text` field of the `json` member instead (dotted paths reach nested fields).

A source with `format: chat` holds dialogs instead: each sample's `<key>.json` is
`{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...], ...}` (messages as
`mm_llama.text.ChatFormat` takes them); the loader encodes it with `ChatFormat.encode_dialog`, so the
header and end-of-turn tokens are in the stream and trained on like any text. A dialog the chat format
rejects is a skipped sample.

A source's `shards` is a path, a glob (`train-*.tar`), a brace pattern (`train-{000000..000031}.tar`),
a `pipe:` command whose stdout is a tar stream (`pipe:aws s3 cp s3://bucket/x.tar -`), a URL that
WebDataset's `gopen` opens, a list of these, or several joined by `::`. Relative paths are resolved
against `data.root`; absolute paths, URLs and `pipe:` commands are used as given (pipes run in the
current directory).

Reading uses WebDataset's own tar iteration (`tar_file_iterator`, `group_by_keys`) but not its
error handlers: `warn_and_continue` sleeps 0.5 s per error and counts nothing, so every skipped
shard and sample goes through `Counters` here and is logged.
"""
from __future__ import annotations

import glob
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..config.errors import ConfigError
from .config import DataConfig, SourceConfig

log = logging.getLogger("mm_llama.data")

# Member mtime of every shard this project writes: an int, fixed, so shards are byte-identical across runs and
# tarfile writes no PAX header per member (a float mtime such as time.time() makes it add one, doubling the
# headers every reader then parses).
TAR_MTIME = 0
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")
_GLOB = re.compile(r"[*?\[]")


class DataError(ValueError):
    """The data cannot feed training (for example every shard of a source is unreadable)."""


def _is_url(spec: str) -> bool:
    m = _SCHEME.match(spec)
    return m is not None and m.group(1) != "file"


def expand_shards(shards: str | list[str], root: str | Path) -> tuple[list[str], list[str]]:
    """Expand a shard spec into `(urls, missing)`: local paths resolved against `root`.

    Braces and `::` are expanded with WebDataset's `expand_urls`, globs with `glob` (sorted);
    `missing` lists every local path or pattern that names no file.
    """
    specs = [shards] if isinstance(shards, str) else list(shards)
    urls, missing = [], []
    for spec in specs:
        for url in expand_urls(spec):
            if _is_url(url):
                urls.append(url)
                continue
            path = Path(url2pathname(urlparse(url).path) if url.startswith("file:") else url).expanduser()
            if not path.is_absolute():
                path = Path(root).expanduser() / path
            if _GLOB.search(str(path)):
                found = sorted(p for p in glob.glob(str(path)) if Path(p).is_file())
                if not found:
                    missing.append(f"{path} (no file matches)")
                urls.extend(found)
            elif path.is_file():
                urls.append(str(path))
            else:
                missing.append(str(path))
    return urls, missing


def source_shards(source: SourceConfig, root: str | Path) -> list[str]:
    """The shard list of one source; ConfigError naming every missing path."""
    urls, missing = expand_shards(source.shards, root)
    if missing:
        raise ConfigError(f"data source '{source.name}': missing shards: {', '.join(missing)}")
    if not urls:
        raise ConfigError(f"data source '{source.name}': the shard spec {source.shards!r} names no shards")
    return urls


def check_sources(cfg: DataConfig) -> None:
    """Raise one ConfigError naming every missing shard path or pattern of every source."""
    problems = []
    for section in ("sources", "heldout"):
        for source in getattr(cfg, section):
            urls, missing = expand_shards(source.shards, cfg.root)
            if missing:
                problems.append(f"{section} '{source.name}': {', '.join(missing)}")
            elif not urls:
                problems.append(f"{section} '{source.name}': {source.shards!r} names no shards")
    if problems:
        raise ConfigError(f"data (root {cfg.root}): missing shards: " + "; ".join(problems))


class _TailKeeper:
    """A read-through stream that keeps its first bytes and its last 1 KiB.

    A tar archive ends with two 512-byte zero blocks, but tarfile's stream reader ends quietly, as if the archive
    were complete, when the bytes stop at a member boundary or inside a header: `read_shard` checks the tail.
    """

    COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd: their own checks

    def __init__(self, stream):
        self.stream, self.head, self.tail = stream, b"", b""

    def __repr__(self) -> str:  # webdataset names the stream in its errors
        return repr(self.stream)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = data[-1024:] if len(data) >= 1024 else (self.tail + data)[-1024:]
        return data

    def ended_cleanly(self) -> bool:
        """Whether the whole stream (read to its end here) closes with the end-of-archive zero blocks."""
        deque(iter(lambda: self.read(1 << 16), b""), maxlen=0)  # read (and keep the tail of) the rest
        return self.head.startswith(self.COMPRESSED) or self.tail == bytes(1024)


def _with_url(files: Iterator[dict], url: str) -> Iterator[dict]:
    for f in files:
        f["__url__"] = url
        yield f


def read_shard(url: str, on_error: Callable[[str, str], None]) -> Iterator[dict]:
    """Samples `{"__key__", "<ext>": bytes, ...}` of one shard, in file order.

    A shard that cannot be opened, or whose tar stream breaks (truncated, garbage bytes, a failing
    pipe), ends here after the samples read so far and is reported as `on_error("shard", message)`; so is a
    stream that stops without the end-of-archive blocks, which tarfile itself takes for a complete archive;
    a repeated member inside one sample is reported as `on_error("sample", message)`.
    """
    try:
        stream = gopen(url, "rb")
    except Exception as e:  # any opener failure: missing file, bad scheme, pipe that cannot start
        on_error("shard", f"{url}: cannot open: {e}")
        return

    def duplicate(exn: Exception) -> bool:
        on_error("sample", f"{url}: {exn.args[0] if exn.args else exn}")
        return True

    finished, kept = False, _TailKeeper(stream)
    try:
        yield from group_by_keys(_with_url(tar_file_iterator(kept), url), handler=duplicate)
        finished = True
        if not kept.ended_cleanly():
            on_error("shard", f"{url}: truncated tar stream: it stops at a member boundary without the "
                              "end-of-archive blocks (the whole samples before the cut were read)")
    except Exception as e:  # tarfile.ReadError, EOFError, zlib/gzip errors, a pipe's IOError
        on_error("shard", f"{url}: unreadable tar stream: {type(e).__name__}: {e}")
    finally:
        try:
            stream.close()
        except Exception as e:  # a pipe whose command failed; only news if the stream looked fine
            if finished:
                on_error("shard", f"{url}: {e}")

"""`mm-llama data demo OUT`: the built-in demo data set, written offline and deterministically.

One writer per modality (`MODALITIES`); each writes its shards under `OUT/<modality>/` and returns
a README section. Text comes from what ships with Python itself: the language reference topics
of `pydoc_data.topics` and the docstrings of a fixed list of standard-library modules, read from
their source with `ast` (never imported, so nothing runs). The same Python version gives the same
bytes.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

TEXT_TRAIN_SHARDS = 8  # enough for 2 ranks x 2 workers to each own shards
VAL_PERCENT = 5
TOKENIZER_RANKS = 4096
MIN_DOCSTRING_CHARS = 200

# Well-documented, pure-Python modules; their docstrings are English technical prose and examples.
DOCSTRING_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "difflib", "doctest", "email", "enum",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "http",
    "imaplib", "inspect", "ipaddress", "json", "locale", "logging", "mailbox", "operator", "optparse",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "sched", "shlex", "shutil", "smtplib",
    "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "traceback", "typing", "unittest", "urllib", "uuid", "warnings", "zipfile",
)


@dataclass
class DemoPart:
    """What one modality's writer produced."""

    modality: str
    counts: dict[str, int]
    readme: str  # a markdown section: the files and their sample schema
    files: list[Path] = field(default_factory=list)


@dataclass
class Document:
    key: str  # tar key: letters, digits, '_' and '-' only (WebDataset splits member names at the first dot)
    text: str
    meta: dict


def _key(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", "-".join(parts)).strip("_")


def _module_documents(name: str) -> Iterator[Document]:
    spec = importlib.util.find_spec(name)  # locates the file; a top-level module is not executed
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    module_doc = ast.get_docstring(tree)
    if module_doc and len(module_doc) >= MIN_DOCSTRING_CHARS:
        yield Document(_key("module", name), f"Module {name}\n\n{module_doc}", {"source": f"python:{name}", "domain": "docstring"})

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                qual = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    kind = "class" if isinstance(node, ast.ClassDef) else "def"
                    yield Document(_key("doc", qual), f"{kind} {qual}\n\n{doc}", {"source": f"python:{name}", "domain": "docstring"})
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body, qual)

    yield from walk(tree.body, name)


def text_documents() -> list[Document]:
    """The demo text corpus: reference topics, then module docstrings, in a fixed order."""
    from pydoc_data.topics import topics

    docs = [
        Document(_key("topic", name), topics[name].strip(), {"source": "pydoc_data.topics", "domain": "reference", "title": name})
        for name in sorted(topics)
        if topics[name].strip()
    ]
    for name in DOCSTRING_MODULES:
        docs.extend(_module_documents(name))
    seen: set[str] = set()  # a name defined twice (e.g. under `if sys.platform`) keeps its first docstring
    return [d for d in docs if not (d.key in seen or seen.add(d.key))]


def is_heldout(doc: Document) -> bool:
    """A stable split by key (`hash()` is salted per process, so a digest instead)."""
    return int(hashlib.sha256(doc.key.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def _write_shard(path: Path, docs: list[Document]) -> None:
    with wds.TarWriter(str(path), mtime=0.0) as sink:  # fixed mtime: identical bytes on every run
        for d in docs:
            sink.write({"__key__": d.key, "txt": d.text, "json": d.meta})


TEXT_README = """\
## text/

- `text/train-{{000000..{last:06d}}}.tar`: {train} documents in {shards} shards (training).
- `text/val-000000.tar`: {val} documents (held out; a disjoint split by key).
- `tokenizer.model`: a {ranks}-rank BPE tokenizer in tiktoken format, trained on the training split.

Each sample is one document:

| member | content |
|---|---|
| `<key>.txt` | the document, UTF-8 text |
| `<key>.json` | `{{"source": ..., "domain": "reference" or "docstring", "title": ...}}` |

The text ships with Python itself: the language reference topics (`pydoc_data.topics`) and
docstrings of standard-library modules.
"""


def write_text(out: Path) -> DemoPart:
    """Text shards, a held-out shard and the tokenizer trained on the training split."""
    from ..text import train_tokenizer

    docs = text_documents()
    train = [d for d in docs if not is_heldout(d)]
    val = [d for d in docs if is_heldout(d)]
    folder = out / "text"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(TEXT_TRAIN_SHARDS):  # round-robin, so every shard mixes both kinds of text
        files.append(folder / f"train-{i:06d}.tar")
        _write_shard(files[-1], train[i::TEXT_TRAIN_SHARDS])
    files.append(folder / "val-000000.tar")
    _write_shard(files[-1], val)
    files.append(train_tokenizer((d.text for d in train), TOKENIZER_RANKS, out / "tokenizer.model"))
    counts = {"train_documents": len(train), "val_documents": len(val), "train_shards": TEXT_TRAIN_SHARDS}
    readme = TEXT_README.format(
        last=TEXT_TRAIN_SHARDS - 1, train=len(train), shards=TEXT_TRAIN_SHARDS, val=len(val), ranks=TOKENIZER_RANKS
    )
    return DemoPart("text", counts, readme, files)


from .demo_vision import write_image  # noqa: E402 (it needs DemoPart, defined above)

from .demo_dialog import write_dialog  # noqa: E402
from .demo_speech import write_speech  # noqa: E402

MODALITIES: dict[str, Callable[[Path], DemoPart]] = {"text": write_text, "image": write_image, "dialog": write_dialog, "speech": write_speech}


def write_demo(out: str | Path, modalities: list[str] | None = None) -> list[DemoPart]:
    """Write the demo data set for `modalities` (default: all) under `out`, plus `out/README.md`."""
    out = Path(out)
    chosen = list(MODALITIES) if not modalities else modalities
    unknown = [m for m in chosen if m not in MODALITIES]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; available: {', '.join(MODALITIES)}")
    out.mkdir(parents=True, exist_ok=True)
    parts = [MODALITIES[m](out) for m in chosen]
    readme = [
        "# mm_llama demo data",
        "",
        "Written by `mm-llama data demo`. WebDataset tar shards: the members of one sample share a key",
        "(the file name up to its first dot). Stage configs point at these files relative to `data.root`.",
        "",
    ]
    (out / "README.md").write_text("\n".join(readme) + "\n" + "\n".join(p.readme for p in parts), encoding="utf-8")
    return parts

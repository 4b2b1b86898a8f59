"""`mm-llama data demo OUT`: the built-in demo data set, written offline and deterministically.

One writer per modality (`MODALITIES`); each writes its shards under `OUT/<modality>/` and returns
a README section. Text comes from what ships with Python itself: the language reference topics
of `pydoc_data.topics` and the docstrings of a fixed list of standard-library modules, read from
their source with `ast` (never imported, so nothing runs). The same Python version gives the same
bytes.

Beside it, the text of the demo world itself (`world_documents`, `world_dialogs`): sentences from the
grammar of the image and video captions and the speech sentences, and short dialogs in the exact chat turns
the image, video and speech adapter stages train on, with text where those have an image, a video or a clip.
A frozen LM in those stages can only read and say what its text pre-training covered (the paper's pre-training
covers what later stages ask about); here that is the world's words, the chat headers and the end of turn.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from .shards import TAR_MTIME

TEXT_TRAIN_SHARDS = 8  # enough for 2 ranks x 2 workers to each own shards
VAL_PERCENT = 5
TOKENIZER_RANKS = 4096
MIN_DOCSTRING_CHARS = 200
WORLD_TRAIN_SHARDS = 4
WORLD_DOCUMENTS = {"train": 400, "val": 40}  # plain-text documents of WORLD_SENTENCES sentences
# Raised whenever the bytes written change (2: video in the world text, a tokenizer that learns the chat turns;
# 3: the world's image questions balanced by type), so `make demo` rewrites an older data/demo instead of training
# on it (`VERSION` file).
DATA_VERSION = 3
WORLD_SENTENCES = 40
WORLD_DIALOGS = {"train": 20000, "val": 400}
# How often each dialog kind is drawn: copying the user's sentence (ASR) is the skill a frozen LM needs most
# to repeat a clip the speech adapter turns into embeddings, and the slowest of these to learn.
DIALOG_KINDS = {"image": 1, "video": 1, "asr": 3, "ast": 1, "dialogue": 1}

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
    with wds.TarWriter(str(path), mtime=TAR_MTIME) as sink:  # fixed mtime: identical bytes on every run
        for d in docs:
            sink.write({"__key__": d.key, "txt": d.text, "json": d.meta})


def _world_rng(kind: str, split: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"demo-world-{kind}-{split}".encode()).hexdigest(), 16))


def world_sentence(rng: random.Random) -> str:
    """One sentence of the demo world: an image or clip caption with a question and its answer, a spoken command,
    or a spoken question and its answer."""
    from . import demo_speech, demo_video, demo_vision

    kind = rng.randrange(4)
    if kind == 0:
        scene, qa = demo_vision.draw_question(rng)
        return f"{demo_vision.caption(scene).capitalize()}. {qa['question']} {qa['answer'].capitalize()}."
    if kind == 3:
        motion = demo_video.make_motion(rng.getrandbits(64))
        qa = rng.choice(demo_video.questions(motion))
        return f"{demo_video.caption(motion).capitalize()}. {qa['question']} {qa['answer'].capitalize()}."
    if kind == 1:
        return demo_speech.sentences()[rng.randrange(len(demo_speech.sentences()))].capitalize() + "."
    question, answer = rng.choice(demo_speech.questions())
    return f"{question.capitalize()}? {answer.capitalize()}."


def world_documents(split: str) -> list[Document]:
    """Plain-text documents of `WORLD_SENTENCES` world sentences each; each split from its own seed."""
    rng = _world_rng("text", split)
    return [Document(_key("world", split, str(i)), " ".join(world_sentence(rng) for _ in range(WORLD_SENTENCES)),
                     {"source": "demo-world", "domain": "world"})
            for i in range(WORLD_DOCUMENTS[split])]


def world_dialog(rng: random.Random) -> list[dict]:
    """One dialog in the turns of an adapter stage, text in place of the image or clip.

    Image or video question: `<|image|>` or `<|video|>` + question → answer (what the pixels would tell is not in
    the text, so the LM learns the answers' form and the end of turn). Speech: the system prompt of ASR or AST
    and the sentence as the user's text → the transcript or its Pig Latin; spoken dialogue: question → answer.
    """
    from . import demo_speech, demo_video, demo_vision
    from .speech import system_prompt

    kind = rng.choices(list(DIALOG_KINDS), weights=list(DIALOG_KINDS.values()))[0]
    if kind in ("image", "video"):
        if kind == "image":
            qa = demo_vision.draw_question(rng)[1]
        else:
            qa = rng.choice(demo_video.questions(demo_video.make_motion(rng.getrandbits(64))))
        return [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": qa["question"]}]},
                {"role": "assistant", "content": qa["answer"]}]
    if kind == "dialogue":
        question, answer = rng.choice(demo_speech.questions())
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    sentence = rng.choice(demo_speech.sentences())
    if kind == "asr":
        prompt, target = system_prompt("asr", demo_speech.LANGUAGE), sentence
    else:
        prompt, target = system_prompt("ast", demo_speech.TRANSLATION_LANGUAGE), demo_speech.pig_latin(sentence)
    return [{"role": "system", "content": prompt}, {"role": "user", "content": sentence},
            {"role": "assistant", "content": target}]


def world_dialogs(split: str) -> list[dict]:
    """Shard samples (`__key__`, `json` = {"messages": ...}) of `WORLD_DIALOGS[split]` dialogs."""
    rng = _world_rng("chat", split)
    return [{"__key__": f"chat-{split}-{i:06d}", "json": {"messages": world_dialog(rng), "source": "demo-world"}}
            for i in range(WORLD_DIALOGS[split])]


def message_texts(messages: list[dict]) -> Iterator[str]:
    """The text of each message of a dialog (a message's text parts, where its content is a list of parts)."""
    for m in messages:
        if isinstance(m["content"], str):
            yield m["content"]
        else:
            yield from (part["text"] for part in m["content"] if part["type"] == "text")


def _write_world(folder: Path) -> tuple[list[Path], dict[str, int], list[str]]:
    """The world's shards, their counts, and the training split's texts (documents and messages) for the tokenizer."""
    files, train_texts = [], []
    for split in ("train", "val"):
        docs, dialogs = world_documents(split), world_dialogs(split)
        if split == "train":
            train_texts = [d.text for d in docs] + [t for d in dialogs for t in message_texts(d["json"]["messages"])]
        n = WORLD_TRAIN_SHARDS if split == "train" else 1
        for i in range(n):
            files.append(folder / f"world-{split}-{i:06d}.tar")
            _write_shard(files[-1], docs[i::n])
            files.append(folder / f"chat-{split}-{i:06d}.tar")
            with wds.TarWriter(str(files[-1]), mtime=TAR_MTIME) as sink:
                for sample in dialogs[i::n]:
                    sink.write(sample)
    counts = {f"world_{k}_documents": v for k, v in WORLD_DOCUMENTS.items()}
    counts.update({f"chat_{k}_dialogs": v for k, v in WORLD_DIALOGS.items()})
    return files, counts, train_texts


TEXT_README = """\
## text/

- `text/train-{{000000..{last:06d}}}.tar`: {train} documents in {shards} shards (training).
- `text/val-000000.tar`: {val} documents (held out; a disjoint split by key).
- `tokenizer.model`: a {ranks}-rank BPE tokenizer in tiktoken format, trained on the training split (the
  documents, the world text and the world dialogs' messages).

Each sample is one document:

| member | content |
|---|---|
| `<key>.txt` | the document, UTF-8 text |
| `<key>.json` | `{{"source": ..., "domain": "reference" or "docstring", "title": ...}}` |

The text ships with Python itself: the language reference topics (`pydoc_data.topics`) and
docstrings of standard-library modules.

The demo world's own text, generated from the image, video and speech data's grammar:

- `text/world-train-{{000000..{world_last:06d}}}.tar`, `text/world-val-000000.tar`: {world_train} and {world_val}
  documents of {sentences} sentences (image and clip captions with a question and its answer, spoken commands,
  spoken questions and answers), same schema as above.
- `text/chat-train-{{000000..{world_last:06d}}}.tar`, `text/chat-val-000000.tar`: {chat_train} and {chat_val}
  dialogs for a source with `format: chat`: `<key>.json` is `{{"messages": [...], "source": "demo-world"}}`, in
  the turns of the adapter stages (an `<|image|>` or `<|video|>` question and its answer; the speech system
  prompts with the sentence as text and its transcript or Pig Latin; a spoken question and its answer).
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
    world_files, world_counts, world_texts = _write_world(folder)
    files += world_files
    # every text the LM trains on, the chat turns' messages too: answers open a turn without a leading space
    # ("bottom left"), a form the documents rarely have: without them "bottom" was "b" + "ottom"
    files.append(train_tokenizer([*(d.text for d in train), *world_texts], TOKENIZER_RANKS, out / "tokenizer.model"))
    counts = {"train_documents": len(train), "val_documents": len(val), "train_shards": TEXT_TRAIN_SHARDS, **world_counts}
    readme = TEXT_README.format(
        last=TEXT_TRAIN_SHARDS - 1, train=len(train), shards=TEXT_TRAIN_SHARDS, val=len(val), ranks=TOKENIZER_RANKS,
        world_last=WORLD_TRAIN_SHARDS - 1, world_train=WORLD_DOCUMENTS["train"], world_val=WORLD_DOCUMENTS["val"],
        sentences=WORLD_SENTENCES, chat_train=WORLD_DIALOGS["train"], chat_val=WORLD_DIALOGS["val"],
    )
    return DemoPart("text", counts, readme, files)


from .demo_vision import write_image  # noqa: E402 (it needs DemoPart, defined above)

from .demo_dialog import write_dialog  # noqa: E402
from .demo_speech import write_speech  # noqa: E402
from .demo_video import write_video  # noqa: E402

MODALITIES: dict[str, Callable[[Path], DemoPart]] = {"text": write_text, "image": write_image, "video": write_video,
                                                     "dialog": write_dialog, "speech": write_speech}


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
    (out / "VERSION").write_text(f"{DATA_VERSION}\n")
    return parts

"""Train a byte-level BPE tokenizer and write it in Llama 3's `tokenizer.model` format.

Training is Hugging Face `tokenizers`' BPE trainer, set up to see text exactly as tiktoken will:
the Llama 3 regex splits the text, then every byte is mapped to one printable character (GPT-2's
byte-level table), with all 256 bytes in the initial alphabet. The learned vocabulary is converted
to tiktoken ranks: ranks 0..255 are the single bytes, then each merge's result in merge order.
tiktoken repeatedly merges the adjacent pair whose concatenation has the lowest rank, which replays
the merges in training order, so both give the same ids for the same text (tests check this).
"""
from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .tokenizer import PAT_STR

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
_BLOCK_CHARS = 1 << 20  # text files are fed to the trainer in blocks of about this many characters


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level table, which `tokenizers.pre_tokenizers.ByteLevel` applies.

    Written out because `tokenizers` exposes only its image (`ByteLevel.alphabet()`), and the
    conversion to tiktoken ranks needs the inverse: printable bytes map to themselves, the other 68
    to chr(256), chr(257), ... in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _hf_bpe_tokenizer():
    """An untrained HF tokenizer whose pre-tokenization matches tiktoken's with `PAT_STR`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_hf_bpe(texts: Iterable[str], n_ranks: int):
    """Train HF `tokenizers` BPE with exactly the setup `train_tokenizer` converts; returns the HF tokenizer."""
    from tokenizers import pre_tokenizers, trainers

    if isinstance(n_ranks, bool) or not isinstance(n_ranks, int) or n_ranks < 256:
        raise ValueError(f"n_ranks must be an integer >= 256 (one rank per byte), got {n_ranks!r}")
    tok = _hf_bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_to_tiktoken_ranks(hf_tokenizer) -> dict[bytes, int]:
    """{token bytes: rank} from a trained HF byte-level BPE: the 256 bytes, then merges in order."""
    to_byte = {u: b for b, u in _byte_to_unicode().items()}
    model = json.loads(hf_tokenizer.to_str())["model"]
    ranks = {bytes([b]): b for b in range(256)}
    for merge in model["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(to_byte[c] for c in left + right)
        # The HF trainer may reach one string by two different merges; its id is the first one's.
        ranks.setdefault(token, len(ranks))
    if len(ranks) != len(model["vocab"]):
        raise RuntimeError(f"converted {len(ranks)} ranks from a vocabulary of {len(model['vocab'])}")
    return ranks


def write_ranks(ranks: dict[bytes, int], out_path: str | Path) -> Path:
    """Write {token bytes: rank} as `base64 rank` lines in rank order, atomically."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text("".join(lines), encoding="ascii")
    os.replace(tmp, out_path)
    return out_path


def train_tokenizer(texts: Iterable[str], n_ranks: int, out_path: str | Path) -> Path:
    """Learn exactly `n_ranks` BPE ranks (256 bytes + n_ranks-256 merges) from `texts`; write `out_path`.

    The special tokens are not in the file: the loader adds 256 of them at ids n_ranks..n_ranks+255.
    """
    hf = train_hf_bpe(texts, n_ranks)
    ranks = hf_to_tiktoken_ranks(hf)
    if len(ranks) != n_ranks:
        raise ValueError(
            f"the training text supports only {len(ranks)} ranks (every pair of adjacent tokens is already "
            f"merged); give more text or ask for fewer than {n_ranks}"
        )
    return write_ranks(ranks, out_path)


def iter_texts(paths: Iterable[str | Path], text_field: str | None = None) -> Iterator[str]:
    """Texts from .txt/.md files (in blocks of whole lines) and JSONL files (field `text_field`, default "text").

    A folder stands for every supported file under it, in sorted order.
    """
    field = text_field or "text"
    for path in _expand(paths):
        if path.suffix in JSONL_SUFFIXES:
            yield from _jsonl_texts(path, field)
        else:
            yield from _text_blocks(path)


def _expand(paths: Iterable[str | Path]) -> Iterator[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise ValueError(f"{p}: no {', '.join(suffixes)} files in this folder")
            yield from found
        elif not p.exists():
            raise FileNotFoundError(f"{p}: training text not found")
        elif p.suffix not in suffixes:
            raise ValueError(f"{p}: unsupported file type {p.suffix!r}; expected one of {', '.join(suffixes)}")
        else:
            yield p


def _text_blocks(path: Path) -> Iterator[str]:
    block: list[str] = []
    size = 0
    for line in _utf8_lines(path):
        block.append(line)
        size += len(line)
        if size >= _BLOCK_CHARS:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


def _utf8_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}, line {lineno}: not valid UTF-8") from None


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for lineno, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}, line {lineno}: no field {field!r} (use --field to pick the text field)")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}, line {lineno}: field {field!r} is {type(text).__name__}, expected a string")
        yield text


def train_tokenizer_from_files(
    paths: Iterable[str | Path], n_ranks: int, out_path: str | Path, text_field: str | None = None
) -> Path:
    """`train_tokenizer` over .txt/.md files, JSONL files (field `text_field`, default "text") or folders of them."""
    files = list(_expand(paths))  # every path is checked before training starts
    return train_tokenizer(iter_texts(files, text_field), n_ranks, out_path)

"""The Llama 3 tokenizer: tiktoken BPE over Meta's `tokenizer.model` file (SPEC.md §1.6).

File format: one line per BPE token, `base64(token bytes) rank`, ranks 0..n-1 (Meta's file has
n = 128,000). tiktoken merges the adjacent pair whose concatenation has the lowest rank, after
splitting the text with the Llama 3 pre-tokenizer regex `PAT_STR`.

Special tokens: 256 ids after the BPE ranks, base = n. Meta's numbering:

    base+0  <|begin_of_text|>             base+6  <|start_header_id|>
    base+1  <|end_of_text|>               base+7  <|end_header_id|>
    base+2  <|reserved_special_token_0|>  base+8  <|eom_id|>
    base+3  <|reserved_special_token_1|>  base+9  <|eot_id|>
    base+4  <|finetune_right_pad_id|>     base+10 <|python_tag|>
    base+5  <|step_id|>                   base+11 <|image|>
    base+12+k  <|reserved_special_token_{2+k}|>,  k = 0..243  (last: base+255)

Project additions: mm_llama takes four of Meta's reserved slots and renames them, so that ids stay
those of Meta's vocabulary (released checkpoints load unchanged, `vocab_size = base + 256`):

    base+12 <|video|>          (was <|reserved_special_token_2|>)  a video's cross-attention anchor
    base+13 <|speech_start|>   (was <|reserved_special_token_3|>)
    base+14 <|speech|>         (was <|reserved_special_token_4|>)  one speech-adapter frame each
    base+15 <|speech_end|>     (was <|reserved_special_token_5|>)

Every other reserved slot keeps Meta's name, so `<|reserved_special_token_6|>` is still base+16.
"""
from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Literal

import tiktoken

PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_SPECIAL_TOKENS = 256

# Meta's first twelve special tokens, in id order from base+0.
META_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the assistant expects a tool result
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)

# mm_llama's renamed reserved slots, in id order from base+12.
PROJECT_SPECIAL_TOKENS = ("<|video|>", "<|speech_start|>", "<|speech|>", "<|speech_end|>")

# tiktoken's Rust core fails on longer inputs (Meta's limit, kept).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# Very long runs of whitespace or of non-whitespace make tiktoken's regex quadratic (Meta's limit).
MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")


def special_token_names() -> list[str]:
    """The 256 special-token names in id order (index i is id base+i)."""
    names = list(META_SPECIAL_TOKENS) + list(PROJECT_SPECIAL_TOKENS)
    # Meta names base+12+k `<|reserved_special_token_{2+k}|>`; the renamed slots keep the numbering.
    names += [f"<|reserved_special_token_{2 + k}|>" for k in range(len(names) - 12, NUM_SPECIAL_TOKENS - 12)]
    return names


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a `tokenizer.model` file into {token bytes: rank}, checking every line.

    Hand-written rather than `tiktoken.load.load_tiktoken_bpe` because that loader names neither the
    file nor the line on bad input and silently accepts duplicate or missing ranks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: tokenizer file not found")
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2:
                raise ValueError(f"{path}, line {lineno}: expected 'base64_token rank', got {_show(line)}")
            token_b64, rank_text = fields
            try:
                token = base64.b64decode(token_b64, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"{path}, line {lineno}: {_show(token_b64)} is not valid base64") from None
            if not token:
                raise ValueError(f"{path}, line {lineno}: empty token")
            if not rank_text.isdigit():
                raise ValueError(f"{path}, line {lineno}: rank {_show(rank_text)} is not a non-negative integer")
            rank = int(rank_text)
            if rank in line_of_rank:
                raise ValueError(f"{path}, line {lineno}: duplicate rank {rank} (first on line {line_of_rank[rank]})")
            if token in ranks:
                first = line_of_rank[ranks[token]]
                raise ValueError(f"{path}, line {lineno}: duplicate token {token!r} (first on line {first})")
            ranks[token] = rank
            line_of_rank[rank] = lineno
    if not ranks:
        raise ValueError(f"{path}: empty tokenizer file (expected lines 'base64_token rank')")
    n = len(ranks)
    if max(line_of_rank) != n - 1:
        missing = min(set(range(n)) - set(line_of_rank))
        high = max(line_of_rank)
        raise ValueError(
            f"{path}, line {line_of_rank[high]}: rank {high} leaves a gap; ranks must be exactly 0..{n - 1} "
            f"(rank {missing} is missing)"
        )
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ValueError(
            f"{path}: {len(missing_bytes)} single bytes have no rank (first: 0x{missing_bytes[0]:02x}); "
            "byte-level BPE needs all 256 so that any text can be encoded"
        )
    return ranks


def _show(raw: bytes, limit: int = 40) -> str:
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _split_long_runs(s: str, limit: int) -> Iterator[str]:
    """Cut `s` so that no piece holds a whitespace or non-whitespace run longer than `limit`."""
    start = 0
    for run in _RUN.finditer(s):
        for cut in range(run.start() + limit, run.end(), limit):
            yield s[start:cut]
            start = cut
    yield s[start:]


class Tokenizer:
    """Llama 3 tokenizer: `n_ranks` BPE ids, then 256 special ids (module docstring)."""

    def __init__(self, ranks: dict[bytes, int], name: str = "tokenizer.model"):
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise ValueError(f"{name}: BPE ranks must be exactly 0..{len(ranks) - 1}")
        self._n_ranks = len(ranks)
        self._special = {tok: self._n_ranks + i for i, tok in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self._special)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        return cls(load_ranks(path), name=Path(path).name)

    # -- sizes and ids -------------------------------------------------------------------------
    @property
    def n_ranks(self) -> int:
        """Number of BPE ranks; also the id of `<|begin_of_text|>`."""
        return self._n_ranks

    @property
    def n_words(self) -> int:
        """Vocabulary size of the language model: BPE ranks + 256 special tokens."""
        return self._n_ranks + NUM_SPECIAL_TOKENS

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def bos_id(self) -> int:
        return self._special["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self._special["<|end_of_text|>"]

    @property
    def eot_id(self) -> int:
        return self._special["<|eot_id|>"]

    @property
    def eom_id(self) -> int:
        return self._special["<|eom_id|>"]

    @property
    def pad_id(self) -> int:
        return self._special["<|finetune_right_pad_id|>"]

    @property
    def start_header_id(self) -> int:
        return self._special["<|start_header_id|>"]

    @property
    def end_header_id(self) -> int:
        return self._special["<|end_header_id|>"]

    @property
    def python_tag_id(self) -> int:
        return self._special["<|python_tag|>"]

    @property
    def image_id(self) -> int:
        return self._special["<|image|>"]

    @property
    def video_id(self) -> int:
        return self._special["<|video|>"]

    @property
    def speech_start_id(self) -> int:
        return self._special["<|speech_start|>"]

    @property
    def speech_id(self) -> int:
        return self._special["<|speech|>"]

    @property
    def speech_end_id(self) -> int:
        return self._special["<|speech_end|>"]

    @property
    def stop_tokens(self) -> set[int]:
        """Generation ends at any of these: end_of_text, eom, eot."""
        return {self.eos_id, self.eom_id, self.eot_id}

    # -- encode / decode -----------------------------------------------------------------------
    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | Collection[str] = (),
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Text -> ids, optionally wrapped in begin_of_text / end_of_text.

        As in Meta's tokenizer, special-token text in `s` is ordinary text unless listed in
        `allowed_special` (or `"all"`); names in `disallowed_special` raise instead.
        Inputs of any length work: they are encoded in pieces of at most 400,000 characters
        with runs of at most 25,000 whitespace or non-whitespace characters.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        # tiktoken wants sets here, not any collection
        allowed = allowed_special if allowed_special == "all" else frozenset(allowed_special)
        disallowed = disallowed_special if disallowed_special == "all" else frozenset(disallowed_special)
        ids: list[int] = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[i : i + TIKTOKEN_MAX_ENCODE_CHARS]
            pieces = _split_long_runs(chunk, MAX_RUN_CHARS) if len(chunk) > MAX_RUN_CHARS else (chunk,)
            for piece in pieces:
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special tokens appear by name, invalid UTF-8 as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Ids -> raw bytes (for streaming: a character may span several tokens)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.n_words]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range [0, {self.n_words})")
        return self.model.decode_bytes(ids)

    def __repr__(self) -> str:
        return f"Tokenizer(n_ranks={self.n_ranks}, n_words={self.n_words})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.model` file, or a folder that holds one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.model"
    return Tokenizer.from_file(path)

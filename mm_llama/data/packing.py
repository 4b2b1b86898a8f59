"""Document packing: tokenised documents, end to end, cut into training rows.

Every document arrives as `[bos] + tokens + [eos]`. Rows hold T+1 consecutive tokens of that
concatenation and start T tokens apart (a row's last token is the next row's first), so inputs are
`row[:-1]`, labels `row[1:]`, and every token after the first is a label exactly once. A label in
a different document than its input (the eos -> next bos step) is -100; `doc_ids` number the
documents within each row from 0, for the document-aware attention mask.

The packer's position is (the document holding the next row's first token, the offset of that
token inside the document): it does not depend on T, so a loader rebuilt with another sequence
length continues at the same token.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

IGNORE = -100


class Packer:
    """Rows of `seq_len + 1` tokens from `documents`, an iterator of `(tokens, position)`.

    `position` is whatever re-creates the document stream so that this document comes next; the
    packer stores it and hands it back in `state()`.
    """

    def __init__(self, documents: Iterator[tuple[list[int], Any]], seq_len: int, offset: int | None = None):
        """`offset=None` starts a fresh stream; an int resumes inside the first document (from `state()`)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.documents = documents
        self.seq_len = seq_len
        self._tokens, self._position = next(documents)
        self._offset = offset or 0
        # documents that entered rows since construction; a resumed one was counted before
        self.new_documents = 1 if offset is None else 0
        if not 0 <= self._offset < len(self._tokens):
            raise ValueError(f"packer offset {offset} lies outside the resumed document ({len(self._tokens)} tokens)")

    def state(self) -> tuple[Any, int]:
        """(position of the document holding the next row's first token, offset inside it)."""
        return self._position, self._offset

    def row(self) -> tuple[list[int], list[int]]:
        """The next row: `(tokens [T+1], doc index within the row [T+1])`; StopIteration at the end of a finite stream."""
        tokens: list[int] = []
        docs: list[int] = []
        doc, start, need = 0, self._offset, self.seq_len + 1
        cur = self._tokens
        while True:
            take = min(len(cur) - start, need)
            tokens += cur[start : start + take]
            docs += [doc] * take
            need -= take
            if need == 0:
                self._offset = start + take - 1  # the row's last token opens the next row
                return tokens, docs
            cur, self._position = next(self.documents)
            self._tokens = cur
            self.new_documents += 1
            doc, start = doc + 1, 0


def rows_to_batch(tokens: list[list[int]], docs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `[B, T+1]` -> `(inputs [B, T], labels [B, T], doc_ids [B, T])`, labels -100 across documents."""
    t = torch.tensor(tokens, dtype=torch.long)
    d = torch.tensor(docs, dtype=torch.long)
    same = d[:, 1:] == d[:, :-1]
    labels = torch.where(same, t[:, 1:], torch.full_like(t[:, 1:], IGNORE))
    return t[:, :-1].contiguous(), labels, d[:, :-1].contiguous()

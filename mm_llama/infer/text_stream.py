"""Generated token ids → text as it becomes final: whole UTF-8 characters, cut at the first stop string.

A character may span several tokens, and a stop string may span several tokens too, so text is
released only once it can no longer change: incomplete UTF-8 is held in the incremental decoder and a
tail that could still become a stop string is held back until the next token decides it.
"""
from __future__ import annotations

import codecs
from collections.abc import Sequence

from ..text import Tokenizer


class TextStream:
    """`push(token)` returns the newly final text (maybe ""); `stopped` turns True at a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._released = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything final so far (after `finish()`, the whole reply)."""
        return self._text[: self._released]

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._text += self._decoder.decode(self.tokenizer.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back (an incomplete character becomes U+FFFD)."""
        if not self.stopped:
            self._text += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self._released - longest + 1)
        hits = [i for s in self.stop if (i := self._text.find(s, search_from)) >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            self._text = self._text[:end]
        elif final:
            end = len(self._text)
        else:
            end = len(self._text) - self._held_tail()
        end = max(end, self._released)
        delta = self._text[self._released:end]
        self._released = end
        return delta

    def _held_tail(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:n]):
                    best = n
                    break
        return best

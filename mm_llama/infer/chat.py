"""A chat session: the dialog so far in the Llama 3 chat format, with the media attached to it.

Used by `mm-llama chat`. Media attached with `attach_*` go into the next user message; every image of
the dialog stays attached to its `<|image|>` for later turns. A turn that fails (e.g. the dialog no
longer fits the context) leaves the history as it was.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..text import ChatFormat
from .generate import Completion, Generator, Prompt
from .loading import Capabilities
from .media import MediaError, MediaLimits, read_image_file
from .sampling import SamplingConfig


class ChatSession:
    def __init__(self, generator: Generator, config: SamplingConfig, system: str | None = None,
                 limits: MediaLimits = MediaLimits()):
        if generator.tokenizer is None:
            raise ValueError("a chat session needs a Generator with a tokenizer")
        self.generator, self.config, self.system, self.limits = generator, config, system, limits
        self.chat_format = ChatFormat(generator.tokenizer)
        self.capabilities = Capabilities.of(generator.model)
        self.reset()

    def reset(self) -> None:
        """Forget the dialog and any pending attachments (the system prompt stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []
        self._pending_parts: list[dict] = []
        self._pending_images: list = []

    @property
    def pending(self) -> list[dict]:
        """Parts attached to the next user message."""
        return list(self._pending_parts)

    def attach_image(self, path: str | Path) -> None:
        self.capabilities.require("image")
        if len(self.images) + len(self._pending_images) >= self.limits.max_images:
            raise MediaError(f"{path}: the dialog already holds max_images={self.limits.max_images} images",
                             "max_images")
        image = read_image_file(path, self.limits)
        self._pending_parts.append({"type": "image", "path": str(path)})
        self._pending_images.append(image)

    def attach_audio(self, path: str | Path) -> None:
        self.capabilities.require("audio")

    def attach_video(self, folder: str | Path) -> None:
        self.capabilities.require("video")

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        """Add a user turn (text + pending attachments), generate the reply, keep both in the history."""
        user = {"role": "user", "content": [*self._pending_parts, {"type": "text", "text": text}]}
        messages = [*self.messages, user]
        tokens = self.chat_format.encode_dialog(messages, add_generation_prompt=True).tokens
        prompt = Prompt(tokens, [*self.images, *self._pending_images])
        callback = (lambda event: on_text(event.text) if event.text else None) if on_text is not None else None
        done = self.generator.generate([prompt], self.config, callback)[0]
        self.messages = [*messages, {"role": "assistant", "content": done.text}]
        self.images += self._pending_images
        self._pending_parts, self._pending_images = [], []
        return done

    def save(self, path: str | Path) -> Path:
        """Write the dialog as JSON: `{"messages": [...]}`, images by the path they were attached from."""
        path = Path(path)
        path.write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

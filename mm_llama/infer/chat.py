"""A chat session: the dialog so far in the Llama 3 chat format, with the media attached to it.

Used by `mm-llama chat`. Media attached with `attach_*` go into the next user message; every image and
audio clip of the dialog stays attached to its placeholders for later turns. A clip becomes
`<|speech_start|> <|speech|>×L <|speech_end|>` in the user message, as the speech adapter stage lays it
out; a user message may hold only attachments (no text), which is exactly the training layout. A turn
that fails (e.g. the dialog no longer fits the context) leaves the history as it was.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..text import ChatFormat
from .generate import Completion, Generator, Prompt
from .loading import Capabilities
from .media import MediaError, MediaLimits, read_audio_file, read_image_file
from .sampling import SamplingConfig
from .speech import audio_part, prepare_audio


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
        self.audio: list = []
        self.videos: list = []
        self._pending_parts: list[dict] = []
        self._pending_images: list = []
        self._pending_audio: list = []
        self._pending_videos: list = []

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
        """A WAV/FLAC/OGG/MP3 file, at most `max_audio_seconds` long, for the next user message."""
        self.capabilities.require("audio")
        config = self.generator.model.config
        samples, rate = read_audio_file(path, self.limits)
        wave = prepare_audio(samples, rate, config, str(path))
        self._pending_parts.append({**audio_part(wave, config), "path": str(path)})
        self._pending_audio.append(wave)

    def attach_video(self, folder: str | Path) -> None:
        """A folder of frame images (sorted by name), sampled and tiled as the video stage's loader does."""
        self.capabilities.require("video")
        from ..data.video import frames_from_folder

        model = self.generator.model
        if not Path(folder).is_dir():
            raise MediaError(f"{folder}: /video takes a folder of frame images")
        enc = model.config.encoder
        try:
            clip, _ = frames_from_folder(folder, enc.tile_size, enc.max_num_tiles, model.video_config.max_frames,
                                         self.limits.max_image_pixels)
        except ValueError as e:
            raise MediaError(str(e)) from None
        self._pending_parts.append({"type": "video", "path": str(folder)})
        self._pending_videos.append(clip)

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        """Add a user turn (pending attachments, then `text` unless it is empty), generate the reply, keep
        both in the history."""
        if not text and not self._pending_parts:
            raise ValueError("nothing to send: type a message or attach media first")
        user = {"role": "user", "content": [*self._pending_parts, *([{"type": "text", "text": text}] if text else [])]}
        messages = [*self.messages, user]
        tokens = self.chat_format.encode_dialog(messages, add_generation_prompt=True).tokens
        prompt = Prompt(tokens, [*self.images, *self._pending_images], audio=[*self.audio, *self._pending_audio],
                        videos=[*self.videos, *self._pending_videos])
        callback = (lambda event: on_text(event.text) if event.text else None) if on_text is not None else None
        done = self.generator.generate([prompt], self.config, callback)[0]
        self.messages = [*messages, {"role": "assistant", "content": done.text}]
        self.images += self._pending_images
        self.audio += self._pending_audio
        self.videos += self._pending_videos
        self._pending_parts, self._pending_images, self._pending_audio, self._pending_videos = [], [], [], []
        return done

    def save(self, path: str | Path) -> Path:
        """Write the dialog as JSON: `{"messages": [...]}`, media by the path they were attached from (audio
        parts also with their `frames`)."""
        path = Path(path)
        path.write_text(json.dumps({"messages": self.messages}, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

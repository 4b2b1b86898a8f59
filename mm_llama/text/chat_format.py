"""The Llama 3 dialog format (SPEC.md §3.1, paper §4.1.1), with mm_llama's media placeholders.

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ...
    <|start_header_id|>assistant<|end_header_id|>\\n\\n          (the generation prompt)

A message is a dict:

    {"role": "system" | "user" | "assistant" | "ipython" | "tool",   # "tool" is written as ipython
     "content": str | [part, ...],
     "tool_call": str,      # assistant only: emitted after <|python_tag|>, e.g. 'brave_search.call(query="x")'
     "eom": bool}           # assistant only: end with <|eom_id|> (a tool result follows), not <|eot_id|>

Parts: {"type": "text", "text": str}; {"type": "image"} -> <|image|>; {"type": "video"} -> <|video|>;
{"type": "audio", "frames": L} -> <|speech_start|> + L x <|speech|> + <|speech_end|>, one <|speech|>
per speech-adapter output frame (its embedding replaces the placeholder's). Media parts are input
only, so they may not appear in assistant messages.

Message text is always encoded with special-token names as plain text, so a user cannot forge a
header or a turn end by typing one.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .tokenizer import Tokenizer

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "ipython": "ipython", "tool": "ipython"}
PART_TYPES = ("text", "image", "video", "audio")
MESSAGE_KEYS = ("role", "content", "tool_call", "eom")


@dataclass
class EncodedDialog:
    """A dialog as ids; `loss_mask[i]` is True where token i is a training target (assistant output)."""

    tokens: list[int] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


class ChatFormat:
    """Encode dialogs in the Llama 3 chat format; the loss mask covers exactly what the assistant says."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
        """`<|start_header_id|>{role}<|end_header_id|>\\n\\n` for a role name (tool -> ipython)."""
        tok = self.tokenizer
        if role not in ROLES:
            raise ValueError(f"role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        name = ROLES[role]
        return [tok.start_header_id, *self._text(name), tok.end_header_id, *self._text("\n\n")]

    def encode_message(self, message: Mapping) -> tuple[list[int], list[bool]]:
        """One message: header, content, terminator. Returns (tokens, loss_mask)."""
        return self._encode_message(message, "message")

    def encode_dialog(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> EncodedDialog:
        """`<|begin_of_text|>` + every message [+ an empty assistant header for the model to complete]."""
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise ValueError(f"messages: expected a list of message dicts, got {type(messages).__name__}")
        if not messages:
            raise ValueError("messages: the dialog is empty")
        out = EncodedDialog([self.tokenizer.bos_id], [False])
        for i, message in enumerate(messages):
            tokens, mask = self._encode_message(message, f"messages[{i}]")
            out.tokens += tokens
            out.loss_mask += mask
        if add_generation_prompt:
            header = self.encode_header("assistant")
            out.tokens += header
            out.loss_mask += [False] * len(header)
        return out

    def decode_assistant(self, ids: Sequence[int]) -> str:
        """Generated ids -> the reply's text: everything before the first stop token (eot, eom, end_of_text)."""
        stops = self.tokenizer.stop_tokens
        ids = list(ids)
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:end])

    # -- internals -----------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False, allowed_special=frozenset(), disallowed_special=())

    def _encode_message(self, message: Mapping, where: str) -> tuple[list[int], list[bool]]:
        tok = self.tokenizer
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        unknown = [k for k in message if k not in MESSAGE_KEYS]
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field; a message has {', '.join(MESSAGE_KEYS)}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        is_assistant = role == "assistant"
        tool_call = message.get("tool_call")
        eom = message.get("eom", False)
        for key, value, kind in (("tool_call", tool_call, str), ("eom", eom, bool)):
            if key in message and not is_assistant:
                raise ValueError(f"{where}.{key}: only assistant messages have {key!r} (role is {role!r})")
            if key in message and not isinstance(value, kind):
                raise ValueError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
        if "content" not in message and tool_call is None:
            raise ValueError(f"{where}.content: missing")

        content = self._encode_content(message.get("content", ""), where, is_assistant)
        if tool_call is not None:
            content += [tok.python_tag_id, *self._text(tool_call)]
        content.append(tok.eom_id if eom else tok.eot_id)
        header = self.encode_header(role)
        return header + content, [False] * len(header) + [is_assistant] * len(content)

    def _encode_content(self, content, where: str, is_assistant: bool) -> list[int]:
        if isinstance(content, str):
            return self._text(content)
        if isinstance(content, Mapping) or not isinstance(content, Sequence):
            raise ValueError(f"{where}.content: expected a string or a list of parts, got {type(content).__name__}")
        tok = self.tokenizer
        ids: list[int] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if not isinstance(part, Mapping):
                raise ValueError(f"{at}: expected a dict with a 'type', got {type(part).__name__}")
            kind = part.get("type")
            if kind not in PART_TYPES:
                raise ValueError(f"{at}.type: unknown part type {kind!r}; expected one of {', '.join(PART_TYPES)}")
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ValueError(f"{at}.text: expected a string, got {type(text).__name__}")
                ids += self._text(text)
                continue
            if is_assistant:
                raise ValueError(f"{at}.type: assistant messages hold text only, not {kind!r}")
            if kind == "image":
                ids.append(tok.image_id)
            elif kind == "video":
                ids.append(tok.video_id)
            else:
                frames = part.get("frames")
                if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
                    raise ValueError(f"{at}.frames: expected a positive integer (speech-adapter frames), got {frames!r}")
                ids += [tok.speech_start_id, *[tok.speech_id] * frames, tok.speech_end_id]
        return ids

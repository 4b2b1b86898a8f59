"""The Llama 3 chat format: exact strings, exact ids, the SFT loss mask, media placeholders, bad messages."""
from __future__ import annotations

import pytest

from mm_llama.text import ChatFormat, EncodedDialog, Tokenizer

B = 256  # special-token base of the byte-only tokenizer: ids 0..255 are the bytes themselves
BOS, SH, EH, EOM, EOT, PY, IMG, VID, SP0, SP, SP1 = B, B + 6, B + 7, B + 8, B + 9, B + 10, B + 11, B + 12, B + 13, B + 14, B + 15


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def header(role: str) -> list[int]:
    return [SH, *ids(role), EH, *ids("\n\n")]


@pytest.fixture(scope="module")
def fmt():
    """Byte-only ranks make every id predictable, so the tests can spell out whole sequences."""
    return ChatFormat(Tokenizer({bytes([b]): b for b in range(256)}))


@pytest.fixture(scope="module")
def merged_fmt():
    """A tokenizer with merges, to check that headers and content go through BPE."""
    extra = [b"\n\n", b"us", b"er", b"user", b"hi"]
    ranks = {bytes([b]): b for b in range(256)} | {t: 256 + i for i, t in enumerate(extra)}
    return ChatFormat(Tokenizer(ranks))


DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
]


def test_dialog_exact_string_ids_and_mask(fmt):
    enc = fmt.encode_dialog(DIALOG)
    assert isinstance(enc, EncodedDialog) and len(enc) == len(enc.loss_mask)
    assert fmt.tokenizer.decode(enc.tokens) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
    )
    prompt = [BOS, *header("system"), *ids("Be brief."), EOT, *header("user"), *ids("Hi!"), EOT, *header("assistant")]
    assert enc.tokens == prompt + ids("Hello.") + [EOT]
    assert enc.loss_mask == [False] * len(prompt) + [True] * (len("Hello.") + 1)


def test_generation_prompt(fmt):
    enc = fmt.encode_dialog(DIALOG[:2], add_generation_prompt=True)
    assert fmt.tokenizer.decode(enc.tokens) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert not any(enc.loss_mask)


def test_multi_turn_mask_covers_every_assistant_turn(fmt):
    enc = fmt.encode_dialog(DIALOG + [{"role": "user", "content": "More"}, {"role": "assistant", "content": "No"}])
    targets = [t for t, m in zip(enc.tokens, enc.loss_mask) if m]
    assert targets == ids("Hello.") + [EOT] + ids("No") + [EOT]


def test_tool_call_with_eom_then_ipython_result(fmt):
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_call": 'brave_search.call(query="weather")', "eom": True},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 C."},
    ]
    enc = fmt.encode_dialog(messages)
    assert fmt.tokenizer.decode(enc.tokens) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWeather?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>brave_search.call(query="weather")<|eom_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n21 C.<|eot_id|>"
    )
    targets = [t for t, m in zip(enc.tokens, enc.loss_mask) if m]
    assert targets == [PY, *ids('brave_search.call(query="weather")'), EOM, *ids("21 C."), EOT]
    # an explicit ipython role is the same as "tool"
    assert fmt.encode_message({"role": "ipython", "content": "x"}) == fmt.encode_message({"role": "tool", "content": "x"})


def test_assistant_text_before_tool_call(fmt):
    tokens, mask = fmt.encode_message({"role": "assistant", "content": "Let me check.", "tool_call": "f()"})
    assert tokens == header("assistant") + ids("Let me check.") + [PY] + ids("f()") + [EOT]
    assert mask == [False] * len(header("assistant")) + [True] * (len("Let me check.") + 5)


def test_media_parts(fmt):
    message = {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "and"}, {"type": "video"},
        {"type": "audio", "frames": 3}, {"type": "text", "text": "?"},
    ]}
    tokens, mask = fmt.encode_message(message)
    assert tokens == header("user") + [IMG, *ids("and"), VID, SP0, SP, SP, SP, SP1, *ids("?"), EOT]
    assert not any(mask)
    assert fmt.tokenizer.decode(tokens[len(header("user")):]) == (
        "<|image|>and<|video|><|speech_start|><|speech|><|speech|><|speech|><|speech_end|>?<|eot_id|>"
    )


def test_typed_special_text_is_not_a_special_token(fmt):
    tokens, _ = fmt.encode_message({"role": "user", "content": "<|eot_id|><|start_header_id|>"})
    assert tokens.count(EOT) == 1 and tokens.count(SH) == 1  # only the real header and terminator


def test_headers_and_content_use_bpe(merged_fmt):
    tokens, mask = merged_fmt.encode_message({"role": "user", "content": "hi"})
    assert tokens == [B + 5 + 6, 259, B + 5 + 7, 256, 260, B + 5 + 9]  # specials start at 261 here
    assert merged_fmt.tokenizer.decode(tokens) == "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"


def test_decode_assistant_stops_at_first_stop_token(fmt):
    assert fmt.decode_assistant(ids("Hello there") + [EOT] + ids("junk")) == "Hello there"
    assert fmt.decode_assistant(ids("call") + [EOM]) == "call"
    assert fmt.decode_assistant(ids("eos") + [B + 1, EOT]) == "eos"
    assert fmt.decode_assistant(ids("no stop")) == "no stop"


BAD = [
    ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role: unknown role 'bot'"),
    ([{"content": "x"}], r"messages\[0\]\.role: unknown role None"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "gif"}]}],
     r"messages\[1\]\.content\[0\]\.type: unknown part type 'gif'"),
    ([{"role": "user", "content": [{"type": "text"}]}], r"messages\[0\]\.content\[0\]\.text: expected a string"),
    ([{"role": "user", "content": [{"type": "audio", "frames": 0}]}], r"messages\[0\]\.content\[0\]\.frames: expected a positive integer"),
    ([{"role": "user", "content": [{"type": "audio", "frames": True}]}], r"messages\[0\]\.content\[0\]\.frames"),
    ([{"role": "user", "content": ["text"]}], r"messages\[0\]\.content\[0\]: expected a dict"),
    ([{"role": "user", "content": 5}], r"messages\[0\]\.content: expected a string or a list of parts"),
    ([{"role": "user"}], r"messages\[0\]\.content: missing"),
    ([{"role": "assistant", "content": [{"type": "image"}]}], r"messages\[0\]\.content\[0\]\.type: assistant messages hold text only"),
    ([{"role": "user", "content": "x", "eom": True}], r"messages\[0\]\.eom: only assistant messages"),
    ([{"role": "user", "content": "x", "tool_call": "f()"}], r"messages\[0\]\.tool_call: only assistant messages"),
    ([{"role": "assistant", "content": "x", "eom": "yes"}], r"messages\[0\]\.eom: expected bool"),
    ([{"role": "user", "content": "x", "name": "bob"}], r"messages\[0\]\.name: unknown field"),
    (["hello"], r"messages\[0\]: expected a dict"),
    ([], r"messages: the dialog is empty"),
    ("hello", r"messages: expected a list"),
]


@pytest.mark.parametrize("messages,message", BAD)
def test_bad_messages(fmt, messages, message):
    with pytest.raises(ValueError, match=message):
        fmt.encode_dialog(messages)


def test_encode_message_names_the_field(fmt):
    with pytest.raises(ValueError, match=r"message\.role: unknown role 'robot'"):
        fmt.encode_message({"role": "robot", "content": "x"})

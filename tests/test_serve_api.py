"""`mm-llama serve`: the OpenAI-compatible API through the official `openai` client, bounds, and bad requests."""
from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import soundfile
import torch

from mm_llama.cli import build_parser
from mm_llama.infer import Generator, MediaLimits, Prompt, SamplingConfig, find_tokenizer, load_model
from mm_llama.serve import BackgroundServer, ServerLimits, create_app
from mm_llama.text import ChatFormat
from serve_helpers import (
    audio_bytes,
    make_tokenizer,
    picture,
    png_bytes,
    speech_checkpoint,
    text_checkpoint,
    tone,
    vision_checkpoint,
)

LIMITS = ServerLimits(max_body_bytes=256 * 1024, max_new_tokens=64,
                      media=MediaLimits(max_image_pixels=100 * 100, max_images=2, max_audio_seconds=1.0))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three servers on 127.0.0.1 and free ports: a vision model, a text-only model and a speech model."""
    root = tmp_path_factory.mktemp("serve")
    tok = make_tokenizer(root)
    (root / "allowed").mkdir()
    picture(30, 50).save(root / "allowed" / "pic.png")
    picture(30, 50).save(root / "outside.png")
    out = {"root": root}
    with BackgroundServer(app_for(vision_checkpoint(root / "vision", tok), root / "allowed")) as vision_url, \
            BackgroundServer(app_for(text_checkpoint(root / "text", tok))) as text_url, \
            BackgroundServer(app_for(speech_checkpoint(root / "speech", tok))) as speech_url:
        out.update(vision=vision_url, text=text_url, speech=speech_url)
        yield out


def app_for(ckpt, image_dir=None):
    model, name = load_model(ckpt)
    generator = Generator(model, find_tokenizer(ckpt))
    app = create_app(generator, name, LIMITS, image_dir)
    app.state.generator = generator
    return app


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text="What is in the picture?", image: bytes | None = None) -> list[dict]:
    url = data_url(image if image is not None else png_bytes(picture(30, 50)))
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def post(url: str, body, path="/v1/chat/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def still_serving(url: str) -> None:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert json.loads(r.read())["status"] == "ok"
    status, body = post(url, {"model": model_id(url), "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


def model_id(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def test_openai_client_streams_a_reply_to_an_image(served):
    c = client(served["vision"])
    assert [m.id for m in c.models.list()] == ["tiny-vision"]
    stream = c.chat.completions.create(model="tiny-vision", messages=image_message(), stream=True, max_tokens=12,
                                       temperature=0)
    chunks = list(stream)
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(pieces) >= 2
    whole = c.chat.completions.create(model="tiny-vision", messages=image_message(), max_tokens=12, temperature=0)
    assert "".join(pieces) == whole.choices[0].message.content
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 0
    # the image reached the model: another picture gives another greedy reply
    other = c.chat.completions.create(model="tiny-vision", messages=image_message(image=png_bytes(picture(30, 50, 7))),
                                      max_tokens=12, temperature=0)
    assert other.choices[0].message.content != whole.choices[0].message.content


def test_openai_client_streams_a_reply_to_speech(served):
    """An `input_audio` part (FLAC at 8 kHz): the streamed reply is the greedy reply to the clip's frames."""
    c = client(served["speech"])
    flac = audio_bytes(tone(0.6), 8000, "FLAC")
    messages = [{"role": "system", "content": "Repeat after me in English:"},
                {"role": "user", "content": [{"type": "input_audio",
                                              "input_audio": {"data": b64(flac), "format": "flac"}}]}]
    chunks = list(c.chat.completions.create(model="tiny-speech", messages=messages, stream=True, max_tokens=10,
                                            temperature=0))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
    assert len(pieces) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")

    from encoders.speech.features import decode_audio, resample
    from mm_llama.infer.speech import audio_part

    ckpt = served["root"] / "speech"
    model, _ = load_model(ckpt)
    gen = Generator(model, find_tokenizer(ckpt))
    samples, rate = decode_audio(flac)
    wave = resample(samples, rate, 16000)
    dialog = [messages[0], {"role": "user", "content": [audio_part(wave, model.config)]}]
    tokens = ChatFormat(gen.tokenizer).encode_dialog(dialog, add_generation_prompt=True).tokens
    expected = gen.generate([Prompt(tokens, audio=[wave])], SamplingConfig(max_new_tokens=10))[0].text
    assert "".join(pieces) == expected
    silent = gen.generate([Prompt(tokens, audio=[torch.zeros_like(wave)])], SamplingConfig(max_new_tokens=10))[0].text
    assert silent != expected  # the audio reached the model


def test_reply_equals_direct_generation_with_stop_string(served):
    c = client(served["text"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    full = c.chat.completions.create(model="tiny-text", messages=messages, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    ckpt = served["root"] / "text"
    model, _ = load_model(ckpt)
    gen = Generator(model, find_tokenizer(ckpt))
    tokens = ChatFormat(gen.tokenizer).encode_dialog(messages, add_generation_prompt=True).tokens
    assert text == gen.generate([Prompt(tokens)], SamplingConfig(max_new_tokens=16))[0].text
    stop = text[len(text) // 2:][:2]
    cut = c.chat.completions.create(model="tiny-text", messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_sse_wire_format(served):
    body = {"model": "tiny-text", "stream": True, "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
    request = urllib.request.Request(served["text"] + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_concurrent_requests_do_not_touch_each_other(served):
    """Greedy and seeded replies are the same whether a request runs alone or among others (queued or batched)."""
    url = served["text"]
    requests = [{"model": "tiny-text", "max_tokens": 8, "temperature": 0,
                 "messages": [{"role": "user", "content": f"Message number {i} " * (i + 1)}]} for i in range(4)]
    requests += [{"model": "tiny-text", "max_tokens": 8, "temperature": 1.0, "seed": 11,
                  "messages": [{"role": "user", "content": "Seeded"}]}]
    alone = [post(url, r)[1]["choices"][0]["message"]["content"] for r in requests]
    together: list = [None] * len(requests)

    def run(i):
        together[i] = post(url, requests[i])[1]["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def wav(seconds: float) -> str:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(int(16000 * seconds), dtype=np.float32), 16000, format="WAV")
    return base64.b64encode(out.getvalue()).decode()


def audio_message(seconds: float, data: str | None = None, fmt: str = "wav") -> list[dict]:
    audio = {"data": wav(seconds) if data is None else data, "format": fmt}
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": audio},
                                         {"type": "text", "text": "What was said?"}]}]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD = {
    "non_image_bytes": ("vision", {"messages": image_message(image=b"definitely not a picture")}, 400, "invalid_image",
                        "not a decodable image"),
    "oversized_body": ("vision", {"messages": [{"role": "user", "content": "x" * 300_000}]}, 413, "max_body_bytes",
                       "max_body_bytes=262144"),
    "unknown_model": ("vision", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404,
                      "model_not_found", "'gpt-4o' is not served here"),
    "malformed_json": ("vision", b'{"model": "tiny-vision", "messages": [', 400, "invalid_json", "malformed JSON"),
    "prompt_over_context": ("vision", {"messages": [{"role": "user", "content": "red square " * 300}]}, 400,
                            "context_length_exceeded", "max_prompt_tokens is 255"),
    "image_too_large": ("vision", {"messages": image_message(image=png_bytes(picture(101, 100)))}, 400,
                        "max_image_pixels", "max_image_pixels=10000"),
    "too_many_images": ("vision", {"messages": image_message() + image_message() + image_message()}, 400,
                        "max_images", "max_images is 2"),
    "max_tokens_over_limit": ("vision", {"max_tokens": 65, "messages": [{"role": "user", "content": "hi"}]}, 400,
                              "max_new_tokens", "max_new_tokens=64"),
    "image_to_text_model": ("text", {"messages": image_message()}, 400, "unsupported_input", "no vision encoder"),
    "audio_not_supported": ("vision", {"messages": audio_message(0.5)}, 400, "unsupported_input", "no speech encoder"),
    "audio_too_long": ("vision", {"messages": audio_message(1.5)}, 400, "max_audio_seconds", "max_audio_seconds=1.0"),
    "speech_audio_too_long": ("speech", {"messages": audio_message(1.5)}, 400, "max_audio_seconds",
                              "max_audio_seconds=1.0"),
    "speech_corrupt_audio": ("speech", {"messages": audio_message(0, b64(b"RIFF\x00\x00garbage" * 20))}, 400,
                             "invalid_audio", "not decodable audio"),
    "speech_truncated_flac": ("speech", {"messages": audio_message(0, b64(audio_bytes(tone(0.5), 8000, "FLAC")[:60]),
                                                                   "flac")}, 400, "invalid_audio", "input_audio"),
    "speech_audio_too_short": ("speech", {"messages": audio_message(0.01)}, 400, "invalid_audio", "too short"),
    "speech_audio_not_base64": ("speech", {"messages": audio_message(0, "%%%not base64")}, 400, "invalid_base64",
                                "not valid base64"),
    "image_to_speech_model": ("speech", {"messages": image_message()}, 400, "unsupported_input", "no vision encoder"),
    "remote_url": ("vision", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}, 400, "invalid_image_url",
        "never fetches remote URLs"),
    "missing_messages": ("vision", {}, 400, "invalid_request", "messages"),
    "unknown_part": ("vision", {"messages": [{"role": "user", "content": [{"type": "video_url", "x": 1}]}]}, 400,
                     "invalid_request", "messages.0.content"),
    "bad_temperature": ("vision", {"temperature": -1, "messages": [{"role": "user", "content": "hi"}]}, 400,
                        "invalid_request", "temperature"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(served, case):
    which, body, status, code, message = BAD[case]
    url = served[which]
    if isinstance(body, dict):
        body = {"model": model_id(url), **body}
    got, reply = post(url, body)
    assert (got, reply["error"]["code"]) == (status, code), reply
    assert message in reply["error"]["message"]
    still_serving(url)


def test_local_image_paths_only_inside_the_allowed_folder(served):
    root = served["root"]
    ok, body = post(served["vision"], {"model": "tiny-vision", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(root / "allowed" / "pic.png")}}]}]})
    assert ok == 200, body
    for url in (str(root / "outside.png"), f"file://{root}/allowed/../outside.png"):
        status, body = post(served["vision"], {"model": "tiny-vision", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]})
        assert status == 400 and "not a file under the allowed folder" in body["error"]["message"]
    # the text server was started without --allow-local-images: paths are refused outright
    status, body = post(served["text"], {"model": "tiny-text", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(root / "allowed" / "pic.png")}}]}]})
    assert status == 400 and body["error"]["code"] == "invalid_image_url"


def test_openai_client_sees_errors_as_exceptions(served):
    with pytest.raises(openai.NotFoundError):
        client(served["text"]).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="no vision encoder"):
        client(served["text"]).chat.completions.create(model="tiny-text", messages=image_message(), stream=True)


def test_serve_binds_localhost_by_default():
    args = build_parser().parse_args(["serve", "ckpt"])
    assert args.host == "127.0.0.1" and args.allow_local_images is None

"""The web chat page in real headless Chromium: upload an image (or a clip), send, see the reply stream in.

Needs Debian's `chromium` (driven through Playwright's Python package with `executable_path`; Playwright's
own browser download is never used). `MM_LLAMA_CHROMIUM` overrides the browser path; `MM_LLAMA_ARTIFACTS`
names a folder for the screenshot (default: the test's temporary folder).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from mm_llama.infer import Generator, find_tokenizer, load_model
from mm_llama.serve import BackgroundServer, create_app
from serve_helpers import audio_bytes, make_tokenizer, picture, speech_checkpoint, tone, vision_checkpoint


def chromium() -> str:
    path = os.environ.get("MM_LLAMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path or not Path(path).is_file():
        pytest.fail("no Chromium found: install Debian's package (`apt-get install chromium`) or set "
                    "MM_LLAMA_CHROMIUM to a Chromium binary")
    return path


class RecordingGenerator(Generator):
    """Remembers every prompt and the text it streamed, to check what the page sent and showed."""

    def generate(self, prompts, config, on_token=None):
        out = super().generate(prompts, config, on_token)
        self.seen = getattr(self, "seen", []) + list(zip(prompts, out))
        return out


def test_page_uploads_an_image_and_streams_the_reply(tmp_path):
    browser_path = chromium()
    tok = make_tokenizer(tmp_path)
    ckpt = vision_checkpoint(tmp_path / "vision", tok)
    model, name = load_model(ckpt)
    generator = RecordingGenerator(model, find_tokenizer(ckpt))
    picture(30, 50).save(tmp_path / "pic.png")
    artifacts = Path(os.environ.get("MM_LLAMA_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)

    with BackgroundServer(create_app(generator, name)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-vision'", timeout=20_000)
            page.set_input_files("#file", str(tmp_path / "pic.png"))
            page.fill("#input", "What is in the picture?")
            page.click("#send")
            reply = page.locator("[data-testid=reply][data-finish]")
            reply.wait_for(timeout=60_000)
            shown = reply.text_content()
            chunks = int(reply.get_attribute("data-chunks"))
            assert page.locator(".msg.user img").count() == 1
            page.screenshot(path=str(artifacts / "serve_page.png"))
        finally:
            browser.close()

    (prompt, completion), = generator.seen
    assert len(prompt.images) == 1 and prompt.images[0].size == (50, 30)  # the upload reached the model
    assert prompt.tokens.count(generator.tokenizer.image_id) == 1
    assert chunks >= 2  # streamed, not delivered at once
    assert shown == completion.text and shown
    assert (artifacts / "serve_page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_uploads_audio_and_streams_the_reply(tmp_path):
    """A WAV upload with no text: the speech stage's layout (the clip alone in the user message)."""
    browser_path = chromium()
    tok = make_tokenizer(tmp_path)
    ckpt = speech_checkpoint(tmp_path / "speech", tok)
    model, name = load_model(ckpt)
    generator = RecordingGenerator(model, find_tokenizer(ckpt))
    (tmp_path / "clip.wav").write_bytes(audio_bytes(tone(0.6), 8000))

    with BackgroundServer(create_app(generator, name)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-speech'", timeout=20_000)
            page.set_input_files("#file", str(tmp_path / "clip.wav"))
            page.click("#send")
            reply = page.locator("[data-testid=reply][data-finish]")
            reply.wait_for(timeout=60_000)
            shown = reply.text_content()
            assert page.locator(".msg.user .attachment").text_content() == "audio: clip.wav"
        finally:
            browser.close()

    (prompt, completion), = generator.seen
    assert len(prompt.audio) == 1 and prompt.audio[0].shape == (9600,)  # 0.6 s resampled to 16 kHz
    frames = model.config.adapter_frames(9600)
    speech = generator.tokenizer.speech_id
    assert prompt.tokens.count(speech) == frames
    start = prompt.tokens.index(generator.tokenizer.speech_start_id)
    assert prompt.tokens[start + 1 + frames] == generator.tokenizer.speech_end_id
    assert shown == completion.text and shown

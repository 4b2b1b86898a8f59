"""`mm-llama chat`: history in the Llama 3 chat format, streamed replies, media commands, /reset and /save."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mm_llama.cli import main
from mm_llama.infer import Generator, Prompt, SamplingConfig, load_model
from mm_llama.infer.chat import ChatSession
from mm_llama.text import ChatFormat, load_tokenizer
from serve_helpers import (
    audio_bytes,
    make_tokenizer,
    picture,
    speech_checkpoint,
    text_checkpoint,
    tone,
    vision_checkpoint,
)

GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tok = make_tokenizer(root)
    picture(30, 50).save(root / "pic.png")
    (root / "clip.flac").write_bytes(audio_bytes(tone(0.6, 22050), 22050, "FLAC"))
    return {"text": text_checkpoint(root / "text", tok), "vision": vision_checkpoint(root / "vision", tok),
            "speech": speech_checkpoint(root / "speech", tok), "root": root}


def expected_reply(ckpt: Path, messages: list[dict], images=(), audio=()) -> str:
    """What greedy generation gives for this dialog, computed without the CLI."""
    model, _ = load_model(ckpt)
    tok = load_tokenizer(ckpt / "tokenizer.model")
    tokens = ChatFormat(tok).encode_dialog(messages, add_generation_prompt=True).tokens
    return Generator(model, tok).generate([Prompt(tokens, list(images), audio=list(audio))], GREEDY)[0].text


def chat(monkeypatch, capsys, ckpt: Path, lines: list[str], *options: str) -> str:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "6", *options]) == 0
    return capsys.readouterr().out


def replies(out: str) -> list[str]:
    return [line.removeprefix("assistant> ").removesuffix(" [length]") for line in out.splitlines()
            if line.startswith("assistant> ")]


def test_history_reset_and_save(monkeypatch, capsys, ckpts, tmp_path):
    ckpt = ckpts["text"]
    saved = tmp_path / "dialog.json"
    out = chat(monkeypatch, capsys, ckpt, ["Hello there", "And now?", f"/save {saved}", "/reset", "Hello there"])
    first, second, after_reset = replies(out)
    user = lambda text: {"role": "user", "content": [{"type": "text", "text": text}]}  # noqa: E731
    assert first == expected_reply(ckpt, [user("Hello there")])
    dialog = [user("Hello there"), {"role": "assistant", "content": first}, user("And now?")]
    assert second == expected_reply(ckpt, dialog)  # the second turn sees the first
    assert after_reset == first
    assert json.loads(saved.read_text())["messages"] == [*dialog, {"role": "assistant", "content": second}]
    assert "(dialog cleared)" in out and f"(saved {saved})" in out


def test_image_is_attached_to_the_next_message(monkeypatch, capsys, ckpts):
    ckpt, pic = ckpts["vision"], ckpts["root"] / "pic.png"
    out = chat(monkeypatch, capsys, ckpt, [f"/image {pic}", "What is this?"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    from PIL import Image
    assert replies(out) == [expected_reply(ckpt, messages, [Image.open(pic).convert("RGB")])]
    assert replies(out) != [expected_reply(ckpt, [{"role": "user", "content": "What is this?"}])]


def test_audio_is_spliced_into_the_speech_stage_layout(monkeypatch, capsys, ckpts, tmp_path):
    """`/audio` then an empty line: the speech adapter stage's ASR dialog, with the clip's frames."""
    import soundfile
    import torch
    from encoders.speech.features import resample

    ckpt, clip = ckpts["speech"], ckpts["root"] / "clip.flac"
    saved = tmp_path / "dialog.json"
    out = chat(monkeypatch, capsys, ckpt, [f"/audio {clip}", "", f"/save {saved}"], "--speech-task", "asr",
               "--language", "English")
    samples, rate = soundfile.read(clip, dtype="float32")
    wave = resample(torch.from_numpy(samples), rate, 16000)
    model, _ = load_model(ckpt)
    frames = model.config.adapter_frames(wave.shape[0])
    assert frames == model.config.adapter_frames(samples.shape[0], rate) > 0
    messages = [{"role": "system", "content": "Repeat after me in English:"},
                {"role": "user", "content": [{"type": "audio", "frames": frames}]}]
    reply = expected_reply(ckpt, messages, audio=[wave])
    assert replies(out) == [reply] and reply  # a reply, exactly what the clip gives outside the CLI
    silent = expected_reply(ckpt, messages, audio=[torch.zeros_like(wave)])
    assert reply != silent  # the clip's content reaches the model
    user = json.loads(saved.read_text())["messages"][1]
    assert user == {"role": "user", "content": [{"type": "audio", "frames": frames, "path": str(clip)}]}
    out = chat(monkeypatch, capsys, ckpt, [f"/audio {tmp_path}/missing.wav", "/audio " + __file__, "Hi"])
    assert "missing.wav: no such audio file" in out and "not decodable audio" in out and len(replies(out)) == 1


def test_unsupported_media_and_bad_commands_are_errors_not_crashes(monkeypatch, capsys, ckpts, tmp_path):
    pic = ckpts["root"] / "pic.png"
    out = chat(monkeypatch, capsys, ckpts["text"], [f"/image {pic}", f"/audio {tmp_path}/a.wav", f"/video {tmp_path}",
                                                    "/save", "/bogus", "Hi"])
    assert "error: image input is not supported by this model: it has no vision encoder" in out
    assert "error: audio input is not supported by this model: it has no speech encoder" in out
    assert "error: video input is not supported by this model: it has no video encoder" in out
    assert "error: usage: /save FILE" in out and "unknown command /bogus" in out
    assert len(replies(out)) == 1  # and the chat goes on
    out = chat(monkeypatch, capsys, ckpts["vision"], [f"/image {tmp_path}/missing.png", "/image " + __file__])
    assert "missing.png: no such image file" in out and "not a decodable image" in out


def test_replies_stream_piece_by_piece(ckpts):
    model, _ = load_model(ckpts["text"])
    tok = load_tokenizer(ckpts["text"] / "tokenizer.model")
    session = ChatSession(Generator(model, tok), SamplingConfig(max_new_tokens=12), system="Be brief.")
    pieces = []
    done = session.send("Hello there", on_text=pieces.append)
    assert len(pieces) >= 2 and "".join(pieces) == done.text
    assert session.messages[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.slow  # a fresh interpreter imports torch and open_clip: ~20 s on a busy 2-core machine
def test_console_script_reads_stdin(ckpts):
    """The real entry point, as a user runs it, with a pipe for stdin."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "mm_llama", "chat", str(ckpts["text"]), "--temperature", "0",
                             "--max-new-tokens", "4"], input="Hello there\n/quit\n", capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = Generator(*[load_model(ckpts["text"])[0], load_tokenizer(ckpts["text"] / "tokenizer.model")])
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    tokens = ChatFormat(expected.tokenizer).encode_dialog(messages, add_generation_prompt=True).tokens
    text = expected.generate([Prompt(tokens)], SamplingConfig(max_new_tokens=4))[0].text
    assert f"assistant> {text}" in result.stdout


def test_missing_tokenizer_is_a_clear_error(tmp_path, ckpts, capsys):
    import shutil
    folder = tmp_path / "t"
    shutil.copytree(ckpts["text"], folder)
    (folder / "tokenizer.model").unlink()
    assert main(["chat", str(folder)]) == 1
    assert "no tokenizer found" in capsys.readouterr().err

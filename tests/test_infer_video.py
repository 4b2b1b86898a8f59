"""Videos in generation and chat: cached decoding with a video equals the uncached composed model, and
`/video DIR` in `mm-llama chat` attaches a folder of frames."""
from __future__ import annotations

import io
import sys

import pytest
import torch
from PIL import Image

from mm_llama.cli import main
from mm_llama.config import ModelConfig
from mm_llama.config.video import VideoConfig
from mm_llama.data.video import collate_videos, frames_from_folder
from mm_llama.infer import Generator, Prompt, SamplingConfig, save_multimodal
from mm_llama.infer.chat import ChatSession
from mm_llama.model.multimodal import MultimodalModel
from serve_helpers import lm_args, make_tokenizer, vision_config, vision_model

VIDEO = VideoConfig(max_frames=8, frames_per_group=4, n_latents=3, every_image_layers=1)


def video_model(seed: int = 0) -> MultimodalModel:
    """The tiny image model plus a video adapter, every gate open so a video changes the logits."""
    torch.manual_seed(seed)
    model = MultimodalModel(lm_args(), vision_config(), VIDEO)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.7)
    return model.eval()


def write_frames(folder, n: int, shift: int) -> None:
    """`n` frames of a white square moving right by `shift` pixels per frame."""
    folder.mkdir(parents=True)
    for i in range(n):
        img = Image.new("RGB", (40, 40), (20, 30, 40))
        img.paste((250, 250, 250), (2 + i * shift, 10, 12 + i * shift, 20))
        img.save(folder / f"frame{i:02d}.png")


def clip_of(model, folder):
    enc = model.config.encoder
    return frames_from_folder(folder, enc.tile_size, enc.max_num_tiles, model.video_config.max_frames)[0]


def reference_greedy(model, tokens, clip, n):
    """Greedy continuation by full forward passes of the composed model (no cache)."""
    videos, ratios, mask = collate_videos([clip], model.config.encoder.max_num_tiles, VIDEO.frames_per_group)
    tokens = list(tokens)
    banned = torch.tensor([model.video_token_id, model.image_token_id])
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]), videos=videos, video_aspect_ratios=ratios, frame_mask=mask)[0, -1]
        logits[banned] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens[-n:]


def test_cached_generation_with_a_video_equals_the_uncached_model(tmp_path):
    model = video_model()
    write_frames(tmp_path / "clip", 6, 4)
    clip = clip_of(model, tmp_path / "clip")
    vid = model.video_token_id
    with_video, text_only = [5, 6, vid, 7, 8, 9], [11, 12, 13]
    out = Generator(model).generate([Prompt(with_video, videos=[clip]), Prompt(text_only)],
                                    SamplingConfig(max_new_tokens=6))
    assert out[0].tokens == reference_greedy(model, with_video, clip, 6)
    alone = Generator(model).generate([Prompt(text_only)], SamplingConfig(max_new_tokens=6))[0]
    assert out[1].tokens == alone.tokens  # the video-less row of the batch is untouched by the video


def test_the_video_changes_the_logits_and_bad_inputs_are_named(tmp_path):
    model = video_model()
    write_frames(tmp_path / "right", 6, 4)
    write_frames(tmp_path / "still", 6, 0)
    vid = model.video_token_id

    def last_logits(folder):
        videos, ratios, mask = collate_videos([clip_of(model, folder)], 2, VIDEO.frames_per_group)
        with torch.no_grad():
            return model(torch.tensor([[5, vid, 7]]), videos=videos, video_aspect_ratios=ratios, frame_mask=mask)[0, -1]

    assert not torch.allclose(last_logits(tmp_path / "right"), last_logits(tmp_path / "still"))
    cfg = SamplingConfig(max_new_tokens=6)
    with pytest.raises(ValueError, match="1 <\\|video\\|> tokens but 0 videos"):
        Generator(model).generate([Prompt([5, vid, 7])], cfg)
    with pytest.raises(ValueError, match="no video adapter"):
        Generator(vision_model()).generate([Prompt([5, 7], videos=[clip_of(model, tmp_path / "right")])], cfg)


def test_chat_video_command_attaches_a_folder_of_frames(tmp_path, monkeypatch, capsys):
    tok = make_tokenizer(tmp_path)
    folder = tmp_path / "ckpt"
    save_multimodal(video_model(), ModelConfig(name="tiny-video", lm=lm_args(), vision=vision_config(), video=VIDEO),
                    folder)
    (folder / "tokenizer.model").write_bytes(tok.read_bytes())
    write_frames(tmp_path / "clip", 6, 4)
    lines = [f"/video {tmp_path / 'clip'}", "Which way does it move?", f"/video {tmp_path / 'missing'}", "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    assert main(["chat", str(folder), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert f"(attached {tmp_path / 'clip'} to the next message)" in out.out
    assert out.out.count("assistant> ") == 1
    assert "takes a folder of frame images" in out.out + out.err


def test_chat_session_keeps_the_video_for_later_turns(tmp_path):
    from mm_llama.text import load_tokenizer

    tok = load_tokenizer(make_tokenizer(tmp_path))
    model = video_model()
    write_frames(tmp_path / "clip", 6, 4)
    session = ChatSession(Generator(model, tok), SamplingConfig(max_new_tokens=3, temperature=0.0))
    session.attach_video(tmp_path / "clip")
    session.send("first")
    session.send("second")  # the dialog still holds one <|video|> and its clip
    assert len(session.videos) == 1
    with pytest.raises(Exception, match="video input is not supported"):
        ChatSession(Generator(vision_model(), tok), SamplingConfig()).attach_video(tmp_path / "clip")

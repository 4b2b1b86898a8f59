"""Video data: frame sampling, the shard schema and frame decoding with corrupt-frame accounting, `data pack video`
from frame folders (and the message when a video file needs PyAV), the demo clips."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm_llama.cli import main
from mm_llama.data.demo_vision import jpeg_bytes
from mm_llama.data.demo_video import DIRECTIONS, clip_signature, demo_clips, make_motion, render_frames, sample_of
from mm_llama.data.image_text import ImageCounters
from mm_llama.data.pack_video import MissingExtra, pack_video
from mm_llama.data.shards import read_shard
from mm_llama.data.video import VideoDecoder, collate_videos, frame_members, frames_from_folder, sample_frames


def test_uniform_frame_sampling():
    assert sample_frames(64, 16) == [2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62]
    assert sample_frames(10, 4) == [1, 3, 6, 8]
    assert sample_frames(3, 8) == [0, 1, 2]  # fewer frames than asked: all of them
    assert sample_frames(0, 8) == [] and sample_frames(100, 64) == sorted(set(sample_frames(100, 64)))


def test_frame_members_are_ordered_by_number():
    sample = {"__key__": "k", "json": b"{}", "010.jpg": b"", "002.png": b"", "001.jpg": b"", "1.jpg": b"", "txt": b""}
    assert frame_members(sample) == ["001.jpg", "002.png", "010.jpg"]  # "1.jpg": fewer than 3 digits, not a frame


def frame(colour, size=28) -> bytes:
    return jpeg_bytes(Image.new("RGB", (size, size), colour))


def test_decoder_samples_tiles_and_counts_corrupt_frames():
    good = [frame((10 * i, 0, 0)) for i in range(6)]
    sample = {"__key__": "v", "__url__": "mem"}
    sample.update({f"{i:03d}.jpg": data for i, data in enumerate(good)})
    sample["002.jpg"] = good[2][: len(good[2]) // 2]  # truncated
    sample["004.jpg"] = b""  # empty
    counters = ImageCounters()
    clip = VideoDecoder(tile_size=28, max_tiles=2, max_frames=6)(sample, counters)
    assert len(clip.frames) == 4 and counters.decoded == 4
    assert counters.skipped == {"truncated": 1, "empty": 1}
    assert clip.frames[0].tiles.shape == (1, 3, 28, 28) and clip.frames[0].grid == (1, 1)
    # red channel of frame 3 (the third usable one) is brighter than frame 0's
    assert clip.frames[2].tiles[0, 0].mean() > clip.frames[0].tiles[0, 0].mean()
    three = VideoDecoder(28, 2, max_frames=3)(sample, ImageCounters())
    assert len(three.frames) == 3  # frames 1, 3, 5 of 6
    broken = {"__key__": "b", "000.jpg": b"", "001.jpg": b"not an image"}
    counters = ImageCounters()
    assert VideoDecoder(28, 2, 8)(broken, counters) is None
    assert counters.skipped == {"empty": 1, "undecodable": 1, "no_frames": 1}


def test_collate_pads_frames_to_whole_groups():
    from mm_llama.data.image_text import Tiled
    from mm_llama.data.video import Clip

    one = Tiled(torch.ones(1, 3, 28, 28), (1, 1))
    wide = Tiled(torch.ones(2, 3, 28, 28), (1, 2))
    videos, ratios, mask = collate_videos([Clip([one] * 3), Clip([wide] * 5)], max_tiles=2, frames_per_group=4)
    assert videos.shape == (2, 1, 8, 2, 3, 28, 28)
    assert mask[:, 0].sum(1).tolist() == [3, 5] and ratios[1, 0, 4].tolist() == [1, 2] and ratios[0, 0, 3].tolist() == [0, 0]
    assert videos[0, 0, 0, 1].abs().sum() == 0 and videos[1, 0, 4, 1].abs().sum() > 0


def make_folders(root: Path) -> Path:
    videos = root / "videos"
    for name, n in (("a", 5), ("b", 3), ("empty", 0)):
        (videos / name).mkdir(parents=True)
        for i in range(n):
            (videos / name / f"f{i:02d}.jpg").write_bytes(frame((40 * i, 90, 10)))
    (videos / "b" / "f01.jpg").write_bytes(b"\xff\xd8\xff broken")  # corrupt frame: skipped and counted
    (videos / "c").mkdir()
    Image.new("RGB", (28, 28), (0, 0, 200)).save(videos / "c" / "0.png")
    rows = [{"video": "a", "caption": "a clip", "qa": [{"type": "motion", "question": "Which way?", "answer": "left"}]},
            {"video": "b", "caption": "another"}, {"video": "empty", "caption": "nothing"},
            {"video": "missing", "caption": "gone"}, {"video": "c"}, {"video": "c", "caption": "blue", "qa": "bad"},
            {"video": "c", "caption": "blue"}]
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return videos


def test_pack_frame_folders(tmp_path):
    videos = make_folders(tmp_path)
    report = pack_video(videos, tmp_path / "out", tmp_path / "captions.jsonl", max_frames=4)
    assert report.videos == 3 and report.frames == 4 + 2 + 1
    assert report.skipped == {"undecodable": 1, "no_frames": 1, "missing_video": 1, "no_caption": 1, "bad_record": 1}
    samples = list(read_shard(str(report.shards[0]), lambda *a: pytest.fail(str(a))))
    assert [frame_members(s) for s in samples] == [["000.jpg", "001.jpg", "002.jpg", "003.jpg"], ["000.jpg", "001.jpg"],
                                                   ["000.png"]]
    meta = json.loads(samples[0]["json"])
    assert meta["qa"][0]["answer"] == "left" and meta["num_frames"] == 4 and samples[1]["txt"] == b"another"
    clip = VideoDecoder(28, 2, 8)(samples[0], ImageCounters())
    assert len(clip.frames) == 4
    # frames 1, 2, 3, 4 of 5 (uniform over 5): the first stored frame is source frame 0 with red 40*0 = 0
    red = [float(f.tiles[0, 0].mean()) for f in clip.frames]
    assert red == sorted(red)


def test_pack_cli_and_tsv(tmp_path, capsys):
    videos = make_folders(tmp_path)
    (tmp_path / "c.tsv").write_text("video\tcaption\tquestion\tanswer\ttype\na\tclip a\tWhich way?\tup\tmotion\n")
    assert main(["data", "pack", "video", "--videos", str(videos), "--out", str(tmp_path / "o"),
                 "--captions", str(tmp_path / "c.tsv")]) == 0
    assert "1 videos, 5 frames in 1 shards" in capsys.readouterr().out
    (tmp_path / "bad.tsv").write_text("clip\tcaption\na\tx\n")
    with pytest.raises(ValueError, match="'video' column"):
        pack_video(videos, tmp_path / "o2", tmp_path / "bad.tsv")


def test_video_file_without_pyav_names_the_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (tmp_path / "v" / "clip.txt").write_text("a clip")
    monkeypatch.setitem(sys.modules, "av", None)  # importing av now raises ImportError
    with pytest.raises(MissingExtra, match=r"PyAV.*pip install av"):
        pack_video(tmp_path / "v", tmp_path / "o")
    assert main(["data", "pack", "video", "--videos", str(tmp_path / "v"), "--out", str(tmp_path / "o")]) == 2
    assert "pip install av" in capsys.readouterr().err


def test_frames_from_folder_for_inference(tmp_path):
    videos = make_folders(tmp_path)
    clip, counters = frames_from_folder(videos / "b", tile_size=28, max_tiles=2, max_frames=8)
    assert len(clip.frames) == 2 and counters.skipped == {"undecodable": 1}
    with pytest.raises(ValueError, match="no usable frame"):
        frames_from_folder(videos / "empty", 28, 2, 8)


def test_demo_clips_depend_on_pixels_and_are_deterministic():
    train, val = demo_clips(60, 12)
    assert {m.direction for m in train} == set(DIRECTIONS)
    assert not {clip_signature(m) for m in val} & {clip_signature(m) for m in train}
    again, _ = demo_clips(60, 12)
    assert train == again and sample_of("k", train[0])["000.jpg"] == sample_of("k", again[0])["000.jpg"]
    for seed in range(20):
        m = make_motion(seed)
        frames = [torch.tensor(np.array(f), dtype=torch.float) for f in render_frames(m)]
        ys, xs = [], []
        for f in (frames[0], frames[-1]):  # centre of the pixels that differ from the background
            diff = (f - torch.tensor(m.background, dtype=torch.float)).abs().sum(-1) > 60
            y, x = diff.nonzero().float().mean(0).tolist()
            ys.append(y)
            xs.append(x)
        dx, dy = xs[1] - xs[0], ys[1] - ys[0]
        seen = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert seen == m.direction, (seed, dx, dy)
        assert all(0 <= v < m.size for v in (*xs, *ys))
    qa = json.loads(json.dumps(sample_of("k", train[0])["json"]))["qa"]
    assert {q["type"] for q in qa} == {"motion", "colour", "shape"}

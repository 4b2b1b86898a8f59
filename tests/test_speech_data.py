"""Speech shards: corrupt audio skipped or cropped and counted by reason, prompts, `data pack` for audio."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from encoders.speech.args import FrontEndArgs
from mm_llama.data.shards import read_shard
from mm_llama.data.speech import (
    AudioCounters,
    decode_speech_sample,
    pack_speech,
    read_transcripts,
    speech_samples,
    system_prompt,
)

ARGS = FrontEndArgs()
META = {"task": "asr", "transcript": "hello there", "language": "English"}


def encode(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 300 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def sample(audio: bytes | None, meta: dict | None = META, member: str = "wav", key: str = "k") -> dict:
    s = {"__key__": key}
    if audio is not None:
        s[member] = audio
    if meta is not None:
        s["json"] = json.dumps(meta).encode()
    return s


def test_good_sample_decodes_with_prompt_and_target():
    c = AudioCounters()
    s = decode_speech_sample(sample(encode(tone(0.5), 16_000, "FLAC", "PCM_16"), member="flac"), ARGS, c)
    assert s.wave.shape == (8_000,) and s.wave.dtype == torch.float32
    assert s.prompt == "Repeat after me in English:" and s.target == "hello there"
    assert c.to_dict() == {"decoded": 1, "resampled": 0, "cropped": 0, "skipped": {}}


@pytest.mark.parametrize("audio, meta, reason", [
    (b"this is not audio at all" * 8, META, "bad_header"),
    (encode(np.zeros(0, np.float32), 16_000), META, "empty"),
    (encode(np.array([0.1, np.nan] * 4_000, np.float32), 16_000), META, "non_finite"),
    (encode(np.array([0.1, -np.inf] * 4_000, np.float32), 16_000), META, "non_finite"),
    (encode(tone(0.5, 2_000), 2_000), META, "bad_rate"),
    (encode(tone(0.02), 16_000), META, "too_short"),
    (encode(tone(61, 4_000), 4_000), META, "too_long"),
    (None, META, "no_audio"),
    (encode(tone(0.5), 16_000), {"task": "asr", "language": "English"}, "bad_metadata"),
    (encode(tone(0.5), 16_000), {"task": "summarise"}, "bad_metadata"),
], ids=["garbage", "empty", "nan", "inf", "bad_rate", "too_short", "too_long", "no_audio", "no_transcript",
        "unknown_task"])  # explicit ids: encoded audio bytes differ between pytest-xdist workers
def test_corrupt_audio_is_skipped_and_counted_by_reason(audio, meta, reason):
    c = AudioCounters()
    assert decode_speech_sample(sample(audio, meta), ARGS, c) is None
    assert c.skipped == {reason: 1} and c.decoded == 0


def test_unparseable_json_is_bad_metadata():
    c = AudioCounters()
    s = {"__key__": "k", "wav": encode(tone(0.5), 16_000), "json": b"{not json"}
    assert decode_speech_sample(s, ARGS, c) is None and c.skipped == {"bad_metadata": 1}
    assert decode_speech_sample(sample(encode(tone(0.5), 16_000), None), ARGS, c, require_task=True) is None
    assert c.skipped == {"bad_metadata": 2}


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_unexpected_rate_is_resampled_and_counted(rate):
    c = AudioCounters()
    s = decode_speech_sample(sample(encode(tone(0.5, rate), rate)), ARGS, c)
    assert s.wave.shape == (8_000,) and c.resampled == 1 and c.decoded == 1


def test_long_audio_is_cropped_to_60_seconds_for_pretraining():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 70 * 4_000).astype(np.float32)  # 70 s at 4 kHz keeps the test small
    audio = encode(x, 4_000)
    c = AudioCounters()
    a = decode_speech_sample(sample(audio, None), ARGS, c, crop=True, generator=torch.Generator().manual_seed(1))
    b = decode_speech_sample(sample(audio, None), ARGS, c, crop=True, generator=torch.Generator().manual_seed(1))
    assert a.wave.shape == (60 * 16_000,) and torch.equal(a.wave, b.wave)
    assert c.cropped == 2 and c.resampled == 2 and c.decoded == 2 and not c.skipped
    other = decode_speech_sample(sample(audio, None), ARGS, c, crop=True, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(a.wave, other.wave)
    # the crop is the 60 s window of the original at the offset drawn from the generator
    from encoders.speech.features import resample
    start = int(torch.randint(0, x.shape[0] - 60 * 4_000 + 1, (), generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(a.wave, resample(torch.from_numpy(x[start:start + 60 * 4_000]), 4_000))


def test_stream_drops_bad_samples_and_counters_survive_a_resume():
    good = sample(encode(tone(0.5), 16_000))
    stream = [good, sample(b"junk" * 40), sample(encode(tone(0.5, 8_000), 8_000)), sample(None)]
    c = AudioCounters()
    assert len(list(speech_samples(iter(stream), ARGS, c))) == 2
    restored = AudioCounters.from_dict(json.loads(json.dumps(c.to_dict())))
    assert restored == c and restored.skipped == {"bad_header": 1, "no_audio": 1} and restored.resampled == 1


def test_system_prompts_as_the_paper():
    assert system_prompt("asr", "German") == "Repeat after me in German:"
    assert system_prompt("ast", "English") == "Translate the following sentence into English:"
    assert system_prompt("dialogue", None) is None
    with pytest.raises(ValueError, match="target language"):
        system_prompt("ast", "")
    c = AudioCounters()
    meta = {"task": "ast", "transcript": "hallo", "language": "German", "translation": "hello", "target_language": "English"}
    ast = decode_speech_sample(sample(encode(tone(0.5), 16_000), meta), ARGS, c)
    assert ast.prompt == "Translate the following sentence into English:" and ast.target == "hello"
    dialogue = decode_speech_sample(sample(encode(tone(0.5), 16_000), {"task": "dialogue", "response": "Sure."}), ARGS, c)
    assert dialogue.prompt is None and dialogue.target == "Sure."


def write_audio_folder(root):
    (root / "clips").mkdir(parents=True)
    sf.write(root / "clips/a.wav", tone(0.5), 16_000)
    sf.write(root / "clips/b.flac", tone(0.7, 8_000), 8_000, subtype="PCM_16")
    sf.write(root / "clips/c.ogg", tone(0.5), 16_000, format="OGG")
    (root / "clips/broken.wav").write_bytes(b"RIFF....WAVEjunk")
    sf.write(root / "clips/nan.wav", np.full(800, np.nan, np.float32), 16_000, subtype="FLOAT")


def test_pack_speech_from_a_tsv(tmp_path):
    write_audio_folder(tmp_path)
    (tmp_path / "t.tsv").write_text(
        "audio\ttranscript\tlanguage\n"
        "clips/a.wav\tfirst clip\tEnglish\n"
        "clips/b.flac\tsecond clip\t\n"
        "clips/c.ogg\tthird clip\tFrench\n"
        "clips/broken.wav\tbroken\tEnglish\n"
        "clips/nan.wav\tnan\tEnglish\n"
        "clips/missing.wav\tgone\tEnglish\n"
        "clips/a.wav\t\tEnglish\n", encoding="utf-8")
    report = pack_speech(tmp_path, tmp_path / "out", tmp_path / "t.tsv", language="German")
    assert report.utterances == 3
    assert report.skipped == {"bad_header": 1, "non_finite": 1, "missing_audio": 1, "bad_metadata": 1}
    assert any("t.tsv:8" in p for p in report.problems)  # the line of the record without a transcript
    samples = [s for shard in report.shards for s in read_shard(str(shard), lambda *a: None)]
    members = [sorted(k for k in s if not k.startswith("__")) for s in samples]
    assert members == [["json", "wav"], ["flac", "json"], ["flac", "json"]]  # the OGG clip is re-encoded to FLAC
    c = AudioCounters()
    decoded = [decode_speech_sample(s, ARGS, c) for s in samples]
    assert [d.meta["language"] for d in decoded] == ["English", "German", "French"]  # German: the default fills the gap
    assert [d.prompt for d in decoded][1] == "Repeat after me in German:"
    assert [d.wave.shape[0] for d in decoded] == [8_000, 11_200, 8_000] and c.resampled == 1


def test_pack_speech_jsonl_and_audio_only(tmp_path):
    write_audio_folder(tmp_path)
    (tmp_path / "t.jsonl").write_text(json.dumps({"audio": "clips/a.wav", "task": "dialogue", "response": "Hi."}) + "\n")
    report = pack_speech(tmp_path, tmp_path / "out1", tmp_path / "t.jsonl")
    assert report.utterances == 1 and not report.skipped
    audio_only = pack_speech(tmp_path / "clips", tmp_path / "out2", prefix="bestrq")
    assert audio_only.utterances == 3 and audio_only.skipped == {"bad_header": 1, "non_finite": 1}
    assert all(p.name.startswith("bestrq-") for p in audio_only.shards)


def test_pack_speech_bad_inputs(tmp_path):
    (tmp_path / "t.tsv").write_text("path\ttranscript\nx.wav\thi\n")
    with pytest.raises(ValueError, match="'audio' column"):
        read_transcripts(tmp_path / "t.tsv")
    (tmp_path / "u.tsv").write_text("audio\ttext\nx.wav\thi\n")
    with pytest.raises(ValueError, match=r"unknown columns \['text'\]"):
        read_transcripts(tmp_path / "u.tsv")
    (tmp_path / "t.jsonl").write_text('{"audio": "a.wav"}\n{oops\n')
    with pytest.raises(ValueError, match="t.jsonl:2: not JSON"):
        read_transcripts(tmp_path / "t.jsonl")
    with pytest.raises(FileNotFoundError, match="no such audio folder"):
        pack_speech(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="task 'translate'"):
        pack_speech(tmp_path, tmp_path / "out", task="translate")


def test_more_demo_training_sentences_leave_the_heldout_split_alone(monkeypatch):
    """The demo's held-out sentences (and the spoken training sentences drawn with them) do not move when the
    training set grows, so results before and after compare and text stages that keep them out stay valid."""
    from mm_llama.data import demo_speech as ds

    now = ds.clips()
    train = [c for c in now if c.split == "train" and c.kind == "sentence"]
    heldout = [c for c in now if c.split == "val"]
    assert len(train) == ds.N_TRAIN_SENTENCES == 300 and len({c.text for c in train}) == 300
    assert not {c.text for c in train} & {c.text for c in heldout}
    monkeypatch.setattr(ds, "N_TRAIN_SENTENCES", ds.N_FIRST_TRAIN_SENTENCES)
    before = ds.clips()
    assert [c for c in before if c.split == "val"] == heldout
    assert [c for c in before if c.split == "train" and c.kind == "sentence"] == train[:ds.N_FIRST_TRAIN_SENTENCES]
    assert heldout[0].key == "s040-en_gb_x_rp-165" and train[0].text == before[0].text

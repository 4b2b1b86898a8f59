"""Demo speech data: sentences, split, translations, answers, committed clips, the espeak-ng path, shards."""
import io
import json
import os
import stat
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf

from mm_llama.data import demo_speech as ds
from mm_llama.data.shards import read_shard
from mm_llama.data.speech import AudioCounters, check_metadata, speech_samples
from encoders.speech.args import FrontEndArgs


def test_pig_latin_word_rules():
    assert ds.pig_latin("draw a red star") == "awdray away edray arstay"
    assert ds.pig_latin("move the yellow square up") == "ovemay ethay ellowyay aresquay upway"
    assert ds.pig_latin("eight three") == "eightway eethray"


def test_questions_have_the_right_answers():
    qa = dict(ds.questions())
    assert qa["what is two plus three"] == "five"
    assert qa["what comes after nine"] == "ten"
    assert qa["what is the opposite of up"] == "down"
    assert qa["how many sides does a triangle have"] == "three"
    assert len(qa) == len(ds.questions())  # no question asked twice


def test_heldout_split_is_by_sentence_and_by_voice():
    clips = ds.clips()
    train = [c for c in clips if c.split == "train"]
    val = [c for c in clips if c.split == "val"]
    assert len({c.key for c in clips}) == len(clips)
    assert not {c.text for c in train} & {c.text for c in val}
    assert ds.HELDOUT_VOICE[0] not in {c.voice for c in train}
    val_sentences = [c for c in val if c.kind == "sentence"]
    assert len(val_sentences) == 2 * ds.N_HELDOUT_SENTENCES
    assert sum(c.voice == ds.HELDOUT_VOICE[0] for c in val_sentences) == ds.N_HELDOUT_SENTENCES
    vocabulary = set(" ".join(ds.sentences()).split())
    assert all(set(c.text.split()) <= vocabulary for c in clips if c.kind == "sentence")


def test_records_follow_the_speech_schema():
    records = ds.records(ds.clips())
    assert sorted(records) == ["asr-train", "asr-val", "ast-train", "ast-val", "dialogue-train", "dialogue-val"]
    for items in records.values():
        for clip, meta in items:
            assert check_metadata(meta) is None
    clip, meta = records["ast-train"][0]
    assert meta["translation"] == ds.pig_latin(clip.text) and meta["target_language"] == "Pig Latin"
    clip, meta = records["dialogue-val"][0]
    assert meta["response"] == dict(ds.questions())[clip.text]


def test_committed_clips_cover_every_key_and_stay_small():
    assert ds.ASSETS.stat().st_size < 5 * 2**20
    audio = ds.read_assets()
    assert set(audio) == {c.key for c in ds.clips()}
    wave, rate = sf.read(io.BytesIO(audio[ds.clips()[0].key]), dtype="float32")
    assert rate == ds.SAMPLE_RATE and wave.ndim == 1 and 0.5 < len(wave) / rate < 4.0


def test_encode_clip_trims_silence_and_resamples():
    rate = 22_050
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    wave = np.concatenate([np.zeros(rate), tone, np.zeros(rate)]).astype(np.float32)
    out, out_rate = sf.read(io.BytesIO(ds.encode_clip(wave, rate)), dtype="float32")
    assert out_rate == 16_000
    assert 16_000 <= len(out) <= 16_000 + 2 * 800 + 2  # one second of tone plus 50 ms either side
    assert abs(float(np.abs(out).max()) - 0.9) < 0.02
    with pytest.raises(ValueError, match="silent"):
        ds.encode_clip(np.zeros(100, dtype=np.float32), rate)


@pytest.fixture
def fake_espeak(tmp_path, monkeypatch):
    """An `espeak-ng` on PATH that writes a WAV tone whose length grows with the text (no real synthesis)."""
    script = tmp_path / "bin" / "espeak-ng"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\n"
        "import io, sys, numpy as np, soundfile as sf\n"
        "text = sys.argv[-1]\n"
        "if 'fail' in text:\n    sys.stderr.write('no such voice'); sys.exit(1)\n"
        "n = 220 * len(text)\n"
        "x = np.concatenate([np.zeros(2000), 0.5 * np.sin(np.arange(n) / 5.0), np.zeros(2000)])\n"
        "buf = io.BytesIO(); sf.write(buf, x, 22050, format='WAV', subtype='PCM_16')\n"
        "sys.stdout.buffer.write(buf.getvalue())\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(script.parent))
    return script


def test_synthesis_path_uses_espeak_when_on_path(fake_espeak):
    clips = ds.clips()[:3]
    audio = ds.audio_for(clips)  # auto: espeak-ng is on PATH
    for c in clips:
        wave, rate = sf.read(io.BytesIO(audio[c.key]), dtype="float32")
        assert rate == 16_000
        assert abs(len(wave) - (220 * len(c.text) + 2 * 1102) * 16_000 / 22_050) < 50  # tone + 50 ms pads
    bad = ds.Clip("x", "fail", "en-xx", 150, "train", "sentence")
    with pytest.raises(RuntimeError, match="en-xx.*no such voice"):
        ds.synthesize(bad)


def test_without_espeak_the_committed_clips_are_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="espeak-ng is not on PATH"):
        ds.audio_for(ds.clips()[:1], source="espeak")
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        ds.audio_for(ds.clips()[:1], assets=tmp_path / "missing.tar")
    partial = tmp_path / "partial.tar"
    with tarfile.open(partial, "w") as tar:
        info = tarfile.TarInfo("other.flac")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match=f"partial.tar: lacks 1 demo clips \\(first: {ds.clips()[0].key}\\)"):
        ds.audio_for(ds.clips()[:1], assets=partial)
    with pytest.raises(ValueError, match="source 'tts'"):
        ds.audio_for(ds.clips()[:1], source="tts")


def test_write_speech_shards_decode(tmp_path):
    from mm_llama.data.demo import MODALITIES

    assert MODALITIES["speech"] is ds.write_speech
    part = ds.write_speech(tmp_path, source="assets")
    assert part.counts == {"asr-train": 300, "asr-val": 40, "ast-train": 300, "ast-val": 40,
                           "dialogue-train": 34, "dialogue-val": 6}
    assert "speech/asr-train-{000000..000001}.tar" in part.readme
    counters = AudioCounters()
    samples = []
    for url in sorted(str(p) for p in (tmp_path / "speech").glob("dialogue-val-*.tar")):
        samples += list(speech_samples(read_shard(url, pytest.fail), FrontEndArgs(), counters))
    assert len(samples) == 6 and counters.skipped == {}
    assert all(s.task == "dialogue" and s.prompt is None and s.target for s in samples)
    first = next(read_shard(str(tmp_path / "speech" / "asr-val-000000.tar"), pytest.fail))
    meta = json.loads(first["json"])
    assert meta["task"] == "asr" and meta["language"] == "English" and meta["sample_rate"] == 16_000
    assert os.path.getsize(tmp_path / "speech" / "asr-train-000000.tar") > 0

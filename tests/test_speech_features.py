"""The speech front end: decoding, resampling, log-mel against an independent reference, normalisation, SpecAugment."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from pydantic import ValidationError

from encoders.speech.args import FrontEndArgs, SpecAugmentArgs
from encoders.speech.features import (
    AudioError,
    collate_features,
    decode_audio,
    features,
    log_mel,
    normalize,
    resample,
    spec_augment,
)

ARGS = FrontEndArgs()


def chirp(n: int, rate: int = 16_000, f0: float = 200.0, f1: float = 3000.0, seed: int = 0) -> np.ndarray:
    """A linear chirp plus a 1 kHz tone and a little noise, float64 `[n]`."""
    t = np.arange(n) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * t[-1]))
    noise = np.random.default_rng(seed).normal(0, 0.01, n)
    return 0.5 * np.sin(phase) + 0.2 * np.sin(2 * np.pi * 1000 * t) + noise


def htk_mel_filterbank(n_fft: int, n_mels: int, rate: int) -> np.ndarray:
    """Triangles between HTK-mel-spaced centres, linear in Hz, unnormalised: `[n_fft // 2 + 1, n_mels]`."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    points = hz(np.linspace(mel(0.0), mel(rate / 2), n_mels + 2))
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    lower = (bins[:, None] - points[None, :-2]) / (points[1:-1] - points[:-2])
    upper = (points[None, 2:] - bins[:, None]) / (points[2:] - points[1:-1])
    return np.maximum(0.0, np.minimum(lower, upper))


def reference_log_mel(x: np.ndarray, args: FrontEndArgs) -> np.ndarray:
    """The definition, in float64 numpy: centred reflect-padded frames, periodic Hann, |rfft|², mel, log."""
    win, hop = args.window_samples, args.hop_samples
    padded = np.pad(x, (win // 2, win // 2), mode="reflect")
    n_frames = 1 + (len(padded) - win) // hop
    frames = np.stack([padded[i * hop:i * hop + win] for i in range(n_frames)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    power = np.abs(np.fft.rfft(frames * window, n=win)) ** 2
    return np.log(np.maximum(power @ htk_mel_filterbank(win, args.n_mels, args.sample_rate), 1e-10))


def wav_bytes(x: np.ndarray, rate: int, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_log_mel_matches_the_definition_and_torchaudio():
    x = chirp(8_000)
    ours = log_mel(torch.from_numpy(x).float(), ARGS)
    assert ours.shape == (8_000 // 160 + 1, 80) == (ARGS.num_frames(8_000), 80)
    ref = reference_log_mel(x, ARGS)
    loud = ref > np.log(1e-6)  # float32 rounding dominates only near the floor
    np.testing.assert_allclose(ours.numpy()[loud], ref[loud], atol=2e-3)
    mel = torchaudio.transforms.MelSpectrogram(16_000, n_fft=400, hop_length=160, n_mels=80, mel_scale="htk")
    torch.testing.assert_close(ours, mel(torch.from_numpy(x).float()).clamp_min(1e-10).log().T, atol=1e-5, rtol=1e-5)


def test_log_mel_is_batched_and_frame_count_rule_holds():
    x = torch.from_numpy(np.stack([chirp(4_321, seed=0), chirp(4_321, seed=1)])).float()
    batch = log_mel(x, ARGS)
    assert batch.shape == (2, ARGS.num_frames(4_321), 80)
    torch.testing.assert_close(batch[1], log_mel(x[1], ARGS))
    for n in (201, 479, 480, 1_600, 16_000, 16_159):
        assert log_mel(torch.zeros(n) + 0.1, ARGS).shape[0] == ARGS.num_frames(n)
    assert ARGS.num_frames(200) == 0
    with pytest.raises(AudioError, match="shorter than half"):
        log_mel(torch.zeros(200), ARGS)


@pytest.mark.parametrize("rate", [8_000, 44_100])
def test_resampling_reproduces_the_tone_at_16k(rate):
    def tone(r, seconds=0.25):
        return np.sin(2 * np.pi * 440.0 * np.arange(int(r * seconds)) / r)

    out = resample(torch.from_numpy(tone(rate)).float(), rate)
    expected = torch.from_numpy(tone(16_000)).float()
    assert out.shape == expected.shape
    torch.testing.assert_close(out[200:-200], expected[200:-200], atol=2e-3, rtol=0)  # edges see the sinc's zero padding
    # the front end's log-mel of the resampled audio matches that of native 16 kHz audio where there is energy
    raw = FrontEndArgs(normalize="none")
    ours, native = features(torch.from_numpy(tone(rate)).float(), rate, raw)[3:-3], features(expected, 16_000, raw)[3:-3]
    loud = native > native.max() - 10
    assert loud.sum() > 50
    torch.testing.assert_close(ours[loud], native[loud], atol=0.02, rtol=0)


def test_decode_wav_and_flac_to_mono_float32():
    stereo = np.stack([chirp(3_000), 0.5 * chirp(3_000, seed=3)], axis=1) * 0.5
    wave, rate = decode_audio(wav_bytes(stereo, 22_050))
    assert rate == 22_050 and wave.dtype == torch.float32 and wave.shape == (3_000,)
    np.testing.assert_allclose(wave.numpy(), stereo.mean(1), atol=1e-6)
    flac, rate = decode_audio(wav_bytes(stereo, 16_000, "FLAC", "PCM_16"), start=1_000, n_samples=500)
    assert rate == 16_000 and flac.shape == (500,)
    np.testing.assert_allclose(flac.numpy(), stereo.mean(1)[1_000:1_500], atol=1e-4)


@pytest.mark.parametrize("data, reason", [
    (b"RIFF\x00\x00garbage" * 10, "bad_header"),
    (wav_bytes(np.zeros(0), 16_000), "empty"),
    (wav_bytes(np.array([0.1, np.nan, 0.2] * 200), 16_000), "non_finite"),
    (wav_bytes(np.array([0.1, np.inf, 0.2] * 200), 16_000), "non_finite"),
], ids=["bad_header", "empty", "nan", "inf"])
def test_decode_rejects_corrupt_audio_with_a_reason(data, reason):
    with pytest.raises(AudioError) as e:
        decode_audio(data)
    assert e.value.reason == reason


def test_utterance_normalisation():
    feats = features(torch.from_numpy(chirp(16_000)).float(), 16_000, ARGS)
    torch.testing.assert_close(feats.mean(0), torch.zeros(80), atol=1e-4, rtol=0)
    torch.testing.assert_close(feats.std(0, unbiased=False), torch.ones(80), atol=1e-3, rtol=0)
    raw = features(torch.from_numpy(chirp(16_000)).float(), 16_000, FrontEndArgs(normalize="none"))
    torch.testing.assert_close(normalize(raw), feats)
    # silence does not divide by zero
    assert torch.isfinite(features(torch.zeros(4_000), 16_000, ARGS)).all()


def test_spec_augment_is_seeded_and_masks_bands_and_spans():
    feats = torch.randn(300, 80) + 5.0
    args = SpecAugmentArgs(freq_masks=2, freq_width=10, time_masks=2, time_width=40)
    a = spec_augment(feats, args, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, spec_augment(feats, args, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, spec_augment(feats, args, torch.Generator().manual_seed(2)))
    zero_bins = (a == 0).all(0).sum()
    zero_frames = (a == 0).all(1).sum()
    assert 0 < zero_bins <= 20 and 0 < zero_frames <= 80
    assert torch.equal(a[a != 0], feats[a != 0])
    # only in training, and only when configured
    x = torch.from_numpy(chirp(8_000)).float()
    on = FrontEndArgs(spec_augment=args)
    assert torch.equal(features(x, 16_000, on), features(x, 16_000, ARGS))
    assert not torch.equal(features(x, 16_000, on, train=True, generator=torch.Generator().manual_seed(0)),
                           features(x, 16_000, ARGS))


def test_collate_pads_and_reports_lengths():
    feats, lengths = collate_features([torch.ones(5, 80), torch.ones(3, 80)])
    assert feats.shape == (2, 5, 80) and lengths.tolist() == [5, 3]
    assert feats[1, 3:].abs().sum() == 0


def test_front_end_args_reject_bad_values():
    with pytest.raises(ValidationError, match="hop_ms"):
        FrontEndArgs(hop_ms=0)
    with pytest.raises(ValidationError, match="normalize"):
        FrontEndArgs(normalize="global")
    with pytest.raises(ValidationError, match="extra"):
        FrontEndArgs(n_mel=80)
    with pytest.raises(ValidationError, match="window_ms"):
        FrontEndArgs(window_ms=5, hop_ms=10)

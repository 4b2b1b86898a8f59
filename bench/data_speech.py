"""The speech data pipeline as a real-time factor per core: decode (soundfile) → resample → 80-dim log-mel
(+ per-utterance normalisation), beside torchaudio's `compliance.kaldi.fbank` on the same audio in the same run.

One thread. RTF = processing seconds / audio seconds (lower is better); "× real time" = 1 / RTF. Audio:
synthetic speech-like clips (harmonic chirps with noise bursts) stored as 16-bit FLAC, once at 16 kHz
(no resampling) and once at 44.1 kHz (resampled to 16 kHz).

    python bench/data_speech.py [--clips 20] [--seconds 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import platform
import statistics
import time

import numpy as np
import soundfile as sf
import torch
from torchaudio.compliance import kaldi

from encoders.speech.args import FrontEndArgs
from encoders.speech.features import decode_audio, features, log_mel, resample


def speech_like(seconds: float, rate: int, seed: int) -> np.ndarray:
    """Harmonics of a gliding 100–250 Hz pitch, amplitude-modulated at syllable rate, with noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 100 + 150 * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t + rng.uniform(0, 6))
    bursts = rng.normal(0, 0.3, t.shape) * (np.sin(2 * np.pi * 1.3 * t) > 0.9)
    x = 0.2 * envelope * voiced + 0.05 * bursts
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def flac(x: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def timed(fn, clips, repeats: int) -> float:
    """Median over `repeats` of the seconds to run `fn` on every clip."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for clip in clips:
            fn(clip)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=20)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    args = FrontEndArgs()
    audio_seconds = a.clips * a.seconds

    def kaldi_fbank(wave: torch.Tensor) -> torch.Tensor:
        return kaldi.fbank(wave[None], num_mel_bins=80, frame_length=25.0, frame_shift=10.0, dither=0.0,
                           sample_frequency=16_000)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
          f"{a.clips} clips × {a.seconds:g} s = {audio_seconds:g} s of audio per row\n")
    print("| input | stage | ours: RTF | ours: × real time | kaldi.fbank: RTF | kaldi.fbank: × real time |")
    print("|---|---|---|---|---|---|")
    for rate in (16_000, 44_100):
        data = [flac(speech_like(a.seconds, rate, seed), rate) for seed in range(a.clips)]
        waves = [decode_audio(d)[0] for d in data]
        at16 = [resample(w, rate) for w in waves]
        for w in at16[:1]:  # warm up caches (resampling kernel, mel filterbank)
            features(w, 16_000, args), kaldi_fbank(w)
        rows = [
            ("decode (soundfile)", timed(decode_audio, data, a.repeats), None),
            *([("resample to 16 kHz", timed(lambda w: resample(w, rate), waves, a.repeats), None)] if rate != 16_000 else []),
            ("log-mel", timed(lambda w: log_mel(w, args), at16, a.repeats), timed(kaldi_fbank, at16, a.repeats)),
            ("whole pipeline", timed(lambda d: features(*decode_audio(d), args), data, a.repeats),
             timed(lambda d: kaldi_fbank(resample(*decode_audio(d))), data, a.repeats)),
        ]
        for stage, ours, ref in rows:
            cells = [f"{ours / audio_seconds:.5f}", f"{audio_seconds / ours:,.0f}"]
            cells += [f"{ref / audio_seconds:.5f}", f"{audio_seconds / ref:,.0f}"] if ref else ["", ""]
            print(f"| FLAC {rate / 1000:g} kHz | {stage} | " + " | ".join(cells) + " |")
    print("\nours: soundfile decode, torchaudio resample, MelSpectrogram (n_fft 400, hop 160, 80 HTK mels) + log + "
          "per-utterance normalisation; kaldi.fbank: same decode and resample, 25/10 ms, 80 bins, no dither.")


if __name__ == "__main__":
    main()

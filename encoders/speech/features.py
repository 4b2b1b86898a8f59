"""The speech front end (SPEC §5.2): audio bytes → mono float32 at 16 kHz → 80-dim log-mel → normalised.

Decoding uses soundfile (libsndfile: WAV, FLAC, OGG, MP3), since `torchaudio.load` needs torchcodec and
FFmpeg in torchaudio 2.11. Resampling and the mel filterbank are torchaudio's. The log-mel is
`log(max(|STFT|², 1e-10) · mel)` with a periodic Hann window of 25 ms, a 10 ms hop and centred frames
(reflect padding), so an utterance of `n` samples gives `n // hop + 1` frames (`FrontEndArgs.num_frames`).
"""
from __future__ import annotations

import functools
import io

import numpy as np
import soundfile as sf
import torch
import torchaudio

from .args import FrontEndArgs, SpecAugmentArgs

LOG_FLOOR = 1e-10
NORM_EPS = 1e-5


class AudioError(ValueError):
    """Audio that cannot be used; `reason` is the counter it goes to (`bad_header`, `empty`, `non_finite`, …)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def audio_info(data: bytes) -> tuple[int, int]:
    """`(n_samples, sample_rate)` of encoded audio, read from its header only."""
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError("bad_header", f"not a readable audio file ({e})") from e
    return int(info.frames), int(info.samplerate)


def decode_audio(data: bytes, start: int = 0, n_samples: int = -1) -> tuple[torch.Tensor, int]:
    """Decode `n_samples` from `start` (all by default) → (mono waveform `[samples]` float32, sample rate).

    Channels are averaged. Raises `AudioError` for an unreadable header, no samples, or NaN/inf values.
    """
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sample_rate = f.samplerate
            if start:
                f.seek(start)
            x = f.read(frames=n_samples, dtype="float32", always_2d=True)  # [samples, channels]
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError("bad_header", f"not a readable audio file ({e})") from e
    if x.size == 0:
        raise AudioError("empty", "the audio has no samples")
    if not np.isfinite(x).all():
        raise AudioError("non_finite", "the audio contains NaN or infinite samples")
    return torch.from_numpy(np.ascontiguousarray(x.mean(axis=1))), sample_rate


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig, new)  # caches its windowed-sinc kernel


def resample(wave: torch.Tensor, orig_rate: int, rate: int = 16_000) -> torch.Tensor:
    """`[..., samples]` at `orig_rate` → `[..., samples · rate / orig_rate]` (torchaudio's windowed sinc)."""
    if orig_rate <= 0:
        raise AudioError("bad_rate", f"sample rate must be positive, got {orig_rate}")
    if orig_rate == rate:
        return wave
    return _resampler(orig_rate, rate)(wave)


@functools.lru_cache(maxsize=8)
def _mel_transform(sample_rate: int, n_mels: int, window: int, hop: int) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=sample_rate, n_fft=window, win_length=window, hop_length=hop, n_mels=n_mels,
        power=2.0, center=True, pad_mode="reflect", mel_scale="htk", norm=None,
    )


def min_samples(args: FrontEndArgs, stack: int) -> int:
    """The shortest waveform that gives one stacked encoder frame (and fits the reflect padding)."""
    return max((stack - 1) * args.hop_samples, args.window_samples // 2 + 1)


def log_mel(wave: torch.Tensor, args: FrontEndArgs) -> torch.Tensor:
    """Waveform `[..., samples]` at `args.sample_rate` → log-mel `[..., frames, n_mels]` (float32)."""
    if wave.shape[-1] <= args.window_samples // 2:
        raise AudioError("too_short", f"{wave.shape[-1]} samples is shorter than half a {args.window_ms} ms window")
    mel = _mel_transform(args.sample_rate, args.n_mels, args.window_samples, args.hop_samples).to(wave.device)
    return mel(wave.float()).clamp_min(LOG_FLOOR).log().transpose(-1, -2)


def normalize(feats: torch.Tensor) -> torch.Tensor:
    """Per-utterance, per-bin mean 0 / std 1 over frames: `[..., frames, n_mels]`."""
    mean = feats.mean(dim=-2, keepdim=True)
    var = feats.var(dim=-2, keepdim=True, unbiased=False)
    return (feats - mean) * torch.rsqrt(var + NORM_EPS)


def spec_augment(feats: torch.Tensor, args: SpecAugmentArgs, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero random mel bands and time spans of one utterance `[frames, n_mels]` (a copy).

    Written here rather than with torchaudio's masking transforms because those draw from the global RNG;
    a generator keeps the data stream reproducible and resumable.
    """
    out = feats.clone()
    n_frames, n_mels = out.shape

    def draw(high: int) -> int:  # uniform in [0, high]
        return int(torch.randint(0, high + 1, (), generator=generator))

    for _ in range(args.freq_masks):
        width = draw(min(args.freq_width, n_mels))
        start = draw(n_mels - width)
        out[:, start:start + width] = 0.0
    max_width = min(args.time_width, int(args.max_time_fraction * n_frames))
    for _ in range(args.time_masks):
        width = draw(max_width)
        start = draw(n_frames - width)
        out[start:start + width, :] = 0.0
    return out


def features(
    wave: torch.Tensor, sample_rate: int, args: FrontEndArgs, *, train: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One utterance `[samples]` at any rate → normalised log-mel `[frames, n_mels]`; SpecAugment when
    `train` and `args.spec_augment` is set."""
    feats = log_mel(resample(wave, sample_rate, args.sample_rate), args)
    if args.normalize == "utterance":
        feats = normalize(feats)
    if train and args.spec_augment is not None:
        feats = spec_augment(feats, args.spec_augment, generator)
    return feats


def collate_features(utterances: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterances `[frames_i, n_mels]` → zero-padded `[batch, max_frames, n_mels]` and lengths `[batch]`."""
    lengths = torch.tensor([u.shape[0] for u in utterances], dtype=torch.long)
    return torch.nn.utils.rnn.pad_sequence(utterances, batch_first=True), lengths

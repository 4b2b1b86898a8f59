"""Speech inputs for inference: an audio clip → the speech model's adapter frames, laid out as in training.

A clip is decoded with soundfile and mixed to mono (`media.decode_audio`), resampled to the front end's
rate (16 kHz) and turned into normalised log-mel features by the project's front end
(`encoders.speech.features`, without SpecAugment); the model's Conformer and adapter encode it once per
request. The prompt holds `<|speech_start|> <|speech|>×L <|speech_end|>` — the chat format's
`{"type": "audio", "frames": L}` part with L = `SpeechConfig.adapter_frames(n_samples)` — and the L adapter
frames replace the placeholders' embeddings (`adapters.speech.splice_speech`), exactly as the speech
adapter stage trains. The stage's system prompts (`mm_llama.data.speech.system_prompt`, e.g. "Repeat after
me in English:") select its tasks.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from adapters.speech import splice_speech
from encoders.speech.features import AudioError, collate_features, features, min_samples, resample
from ..config.speech import SpeechConfig
from ..model.speech_lm import SpeechLM
from .media import MediaError


def prepare_audio(samples: np.ndarray, rate: int, config: SpeechConfig, where: str = "audio") -> torch.Tensor:
    """Mono samples `[n]` at `rate` → float32 waveform `[n']` at the front end's rate, long enough for one
    speech frame; `MediaError` naming `where` otherwise."""
    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    if wave.ndim != 1 or wave.numel() == 0:
        raise MediaError(f"{where}: the audio has no samples")
    if not torch.isfinite(wave).all():
        raise MediaError(f"{where}: the audio contains NaN or infinite samples")
    try:
        wave = resample(wave, rate, config.frontend.sample_rate)
    except AudioError as e:
        raise MediaError(f"{where}: {e}") from e
    need = min_samples(config.frontend, config.encoder.stack)
    if wave.shape[0] < need:
        seconds = need / config.frontend.sample_rate
        raise MediaError(f"{where}: {wave.shape[0] / config.frontend.sample_rate * 1000:.0f} ms of audio is too short; "
                         f"the speech encoder needs at least {seconds * 1000:.0f} ms")
    return wave


def audio_part(wave: torch.Tensor, config: SpeechConfig) -> dict:
    """The chat-format part for a prepared clip `[n]`: as many `<|speech|>` placeholders as adapter frames."""
    return {"type": "audio", "frames": config.adapter_frames(wave.shape[0])}


def encode_clips(model: SpeechLM, waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prepared clips (each `[n_i]` at the front end's rate) → adapter frames `[n_clips, frames, dim]` and
    their lengths `[n_clips]`, encoded as one padded batch."""
    weight = model.lm.tok_embeddings.weight
    feats, lengths = collate_features([features(w, model.config.frontend.sample_rate, model.config.frontend)
                                       for w in waves])
    return model.encode_speech(feats.to(weight.device, weight.dtype), lengths.to(weight.device))


def splice_rows(model: SpeechLM, h: torch.Tensor, tokens: torch.Tensor, audio: Sequence[Sequence[torch.Tensor]]
                ) -> torch.Tensor:
    """Embeddings `[batch, seq, dim]` with row i's `<|speech|>` spans replaced by the frames of `audio[i]`
    (its clips in order); rows without clips are left as they are."""
    clips = [w for row in audio for w in row]
    if not clips:
        return h
    frames, lengths = encode_clips(model, clips)
    first = 0
    for i, row in enumerate(audio):
        if row:
            span = slice(first, first + len(row))
            try:
                h[i:i + 1] = splice_speech(h[i:i + 1], tokens[i:i + 1], frames[span], lengths[span], model.speech_ids)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from e
            first += len(row)
    return h

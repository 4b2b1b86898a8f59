"""Speech inputs in generation: audio → front end → encoder + adapter → spliced as in training.

Also: loading composed models with `mm_llama.from_pretrained`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mm_llama
from encoders.speech.features import features, resample
from mm_llama.infer import Generator, MediaError, Prompt, SamplingConfig, load_model
from mm_llama.infer.speech import audio_part, prepare_audio
from mm_llama.model import Transformer
from mm_llama.model.multimodal import MultimodalModel
from mm_llama.model.speech_lm import SpeechLM
from mm_llama.text import ChatFormat, load_tokenizer
from mm_llama.train.tasks.speech_lm import greedy_decode
from serve_helpers import make_tokenizer, speech_checkpoint, speech_model, text_checkpoint, tone, vision_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    tok_path = make_tokenizer(root)
    return {"root": root, "tok_path": tok_path, "tok": load_tokenizer(tok_path), "model": speech_model()}


def asr_prompt(tok, config, wave) -> list[int]:
    """The speech adapter stage's ASR prompt for one clip (`data.speech_loader.DialogBuilder`)."""
    messages = [{"role": "system", "content": "Repeat after me in English:"},
                {"role": "user", "content": [audio_part(wave, config)]}]
    return ChatFormat(tok).encode_dialog(messages, add_generation_prompt=True).tokens


def test_audio_is_encoded_and_spliced_exactly_as_in_training(setup):
    model, tok = setup["model"], setup["tok"]
    wave = prepare_audio(tone(0.7, 8000), 8000, model.config)
    assert wave.shape[0] == 11200  # resampled to 16 kHz
    prompt = asr_prompt(tok, model.config, wave)
    # the stage's own evaluation: encode the clip's features, splice, greedy KV-cached decoding
    feats = features(wave, 16000, model.config.frontend)[None]
    with torch.no_grad():
        frames, lengths = model.encode_speech(feats, torch.tensor([feats.shape[1]]))
        assert lengths.item() == prompt.count(tok.speech_id)
        reference = greedy_decode(model, prompt, (frames, lengths), set(tok.stop_tokens), 8, "cpu")
        full = model(torch.tensor([prompt]), speech_feats=feats)[0, -1]
    out = Generator(model, tok).generate([Prompt(prompt, audio=[wave])], SamplingConfig(max_new_tokens=8),
                                         on_token=None)[0]
    assert out.tokens == reference and out.tokens
    first = {}
    Generator(model, tok).generate([Prompt(prompt, audio=[wave])], SamplingConfig(max_new_tokens=1),
                                   on_token=lambda e: first.setdefault("t", e.token))
    assert first["t"] == int(full.argmax())


def test_batched_clips_of_different_lengths_equal_each_alone(setup):
    model, tok = setup["model"], setup["tok"]
    gen = Generator(model, tok)
    waves = [prepare_audio(tone(s, 16000, f), 16000, model.config) for s, f in ((0.4, 300.0), (0.9, 700.0))]
    prompts = [Prompt(asr_prompt(tok, model.config, w), audio=[w]) for w in waves]
    config = SamplingConfig(max_new_tokens=6)
    together = gen.generate(prompts, config)
    assert [c.tokens for c in together] == [gen.generate([p], config)[0].tokens for p in prompts]
    # one prompt holding both clips: each span takes its own clip's frames, in order
    two = [{"role": "user", "content": [audio_part(waves[0], model.config), audio_part(waves[1], model.config)]}]
    tokens = ChatFormat(tok).encode_dialog(two, add_generation_prompt=True).tokens
    with torch.no_grad():
        frames = [model.encode_speech(features(w, 16000, model.config.frontend)[None])[0][0] for w in waves]
    by_audio = gen.generate([Prompt(tokens, audio=waves)], config)[0].tokens
    assert by_audio == gen.generate([Prompt(tokens, speech=torch.cat(frames))], config)[0].tokens
    with pytest.raises(ValueError, match="audio clip 0 has"):  # swapped clips do not fit the spans
        gen.generate([Prompt(tokens, audio=waves[::-1])], config)


def test_mismatched_audio_is_a_clear_error(setup):
    model, tok = setup["model"], setup["tok"]
    gen = Generator(model, tok)
    short, long = (prepare_audio(tone(s, 16000), 16000, model.config) for s in (0.4, 0.9))
    tokens = asr_prompt(tok, model.config, short)
    with pytest.raises(ValueError, match="prompt 0: audio clip 0 has .* adapter frames but its <\\|speech\\|> span"):
        gen.generate([Prompt(tokens, audio=[long])], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="2 audio clips"):
        gen.generate([Prompt(tokens, audio=[short, short])], SamplingConfig(max_new_tokens=2))
    text_gen = Generator(Transformer(model.args).eval(), tok)
    with pytest.raises(ValueError, match="no speech encoder"):
        text_gen.generate([Prompt(tokens, audio=[short])], SamplingConfig(max_new_tokens=2))


def test_speech_placeholders_are_never_sampled(setup):
    model, tok = setup["model"], setup["tok"]
    gen = Generator(model, tok)
    assert set(model.speech_ids) <= set(gen.banned.tolist())


@pytest.mark.parametrize("samples, rate, message", [
    (np.zeros(0, np.float32), 16000, "no samples"),
    (np.full(1000, np.nan, np.float32), 16000, "NaN or infinite"),
    (np.zeros(100, np.float32), 16000, "too short"),
    (np.zeros(1000, np.float32), 0, "sample rate must be positive"),
])
def test_prepare_audio_rejects_unusable_clips(setup, samples, rate, message):
    with pytest.raises(MediaError, match=f"clip.wav: .*{message}"):
        prepare_audio(samples, rate, setup["model"].config, "clip.wav")


def test_prepared_audio_matches_the_adapter_frame_rule(setup):
    config = setup["model"].config
    for seconds, rate in ((0.3, 8000), (1.0, 22050), (0.55, 16000)):
        samples = tone(seconds, rate)
        wave = prepare_audio(samples, rate, config)
        assert torch.equal(wave, resample(torch.from_numpy(samples), rate, 16000))
        assert audio_part(wave, config)["frames"] == config.adapter_frames(samples.shape[0], rate)


def test_from_pretrained_loads_composed_models_as_our_stages_save_them(setup):
    root, tok = setup["root"], setup["tok_path"]
    speech = mm_llama.from_pretrained(speech_checkpoint(root / "speech", tok))
    assert isinstance(speech, SpeechLM) and not speech.training
    expected = speech_model().state_dict()
    assert speech.state_dict().keys() == expected.keys()
    assert all(torch.equal(speech.state_dict()[k], v) for k, v in expected.items())
    vision = mm_llama.from_pretrained(vision_checkpoint(root / "vision", tok))
    assert isinstance(vision, MultimodalModel)
    text = mm_llama.from_pretrained(text_checkpoint(root / "text", tok), dtype=torch.bfloat16)
    assert type(text) is Transformer and text.tok_embeddings.weight.dtype == torch.bfloat16
    # the same loader as chat and serve
    model, name = load_model(root / "speech")
    assert isinstance(model, SpeechLM) and name == "tiny-speech"


def test_composed_checkpoint_with_wrong_weights_names_the_file(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = speech_checkpoint(tmp_path / "speech", setup["tok_path"])
    state = load_file(folder / "model.safetensors")
    del state["speech_adapter.output.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(Exception, match="model.safetensors.*speech_adapter.output.weight"):
        mm_llama.from_pretrained(folder)


@pytest.mark.slow  # trains the tiny speech adapter stage for 2 steps on the demo clips
def test_speech_adapter_stage_output_chats_about_a_clip(demo_data, tmp_path, monkeypatch, capsys):
    """`final/` of the tiny speech_adapter stage (as `make demo` writes it) loads in `mm-llama chat`, and `/audio`
    with one of the demo clips gives the greedy reply that the generator gives for the stage's ASR layout."""
    import io
    import shutil
    import sys

    from mm_llama.checkpoint.native import save_native
    from mm_llama.cli import main
    from mm_llama.config import ModelConfig, load_config
    from mm_llama.config.stage import StageConfig
    from mm_llama.data.demo_speech import write_speech
    from mm_llama.model import init_weights
    from mm_llama.train.engine import train_stage

    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(demo_data / "tokenizer.model", root / "tokenizer.model")
    write_speech(root, source="assets")
    small = ["model.lm.dim=64", "model.lm.n_layers=2", "model.lm.n_heads=4", "model.lm.n_kv_heads=2",
             "train.micro_batch=2", "train.eval_batches=0", "train.eval_every=0", "run.log_every=1000",
             f"data.root={root}"]
    cfg = load_config(StageConfig, "configs/stages/tiny/speech_adapter.yaml", small)
    lm = init_weights(Transformer(cfg.model.lm), torch.Generator().manual_seed(0))
    save_native(lm, ModelConfig(name="lm", lm=cfg.model.lm), tmp_path / "lm")
    overrides = [*small, "train.steps=2", "train.options.encoder_from=null", f"init.from={tmp_path / 'lm'}",
                 f"run.out_dir={tmp_path / 'run'}"]
    run = train_stage(load_config(StageConfig, "configs/stages/tiny/speech_adapter.yaml", overrides))
    model = mm_llama.from_pretrained(run)
    assert isinstance(model, SpeechLM)
    clip = next(root.glob("speech/asr-val-*.tar"))
    import webdataset as wds
    sample = next(iter(wds.WebDataset(str(clip), shardshuffle=False)))
    member = "flac" if "flac" in sample else "wav"
    (tmp_path / f"clip.{member}").write_bytes(sample[member])

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/audio {tmp_path / f'clip.{member}'}\n\n"))
    assert main(["chat", str(run), "--tokenizer", str(root / "tokenizer.model"), "--temperature", "0",
                 "--max-new-tokens", "5", "--speech-task", "asr", "--language", "English"]) == 0
    out = capsys.readouterr().out
    reply = [line for line in out.splitlines() if line.startswith("assistant> ")]
    tok = load_tokenizer(root / "tokenizer.model")
    from mm_llama.infer.media import read_audio_file
    from mm_llama.infer import MediaLimits
    wave = prepare_audio(*read_audio_file(tmp_path / f"clip.{member}", MediaLimits()), model.config)
    expected = Generator(model, tok).generate([Prompt(asr_prompt(tok, model.config, wave), audio=[wave])],
                                              SamplingConfig(max_new_tokens=5))[0]
    assert reply == [f"assistant> {expected.text}" + ("" if expected.finish_reason == "stop" else " [length]")]

"""Batched KV-cached generation against a no-cache reference, sampling, stops, streaming text, media and loading."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import soundfile
import torch

from encoders.vision.transform import stack_images, tile_image
from mm_llama.checkpoint import CheckpointError
from mm_llama.config import ModelConfig
from mm_llama.infer import (
    Capabilities,
    ContextLengthError,
    Generator,
    MediaError,
    MediaLimits,
    Prompt,
    SamplingConfig,
    TextStream,
    UnsupportedInput,
    find_tokenizer,
    generate,
    load_model,
    sample_next,
    save_multimodal,
)
from mm_llama.infer.decoder import Decoder, padded_attention_mask
from mm_llama.model.masks import AttentionMask
from mm_llama.infer.media import decode_audio, decode_image
from mm_llama.text import load_tokenizer
from serve_helpers import (
    N_RANKS,
    VOCAB,
    lm_args,
    make_tokenizer,
    picture,
    png_bytes,
    text_checkpoint,
    text_model,
    vision_config,
    vision_model,
)

IMAGE_ID = N_RANKS + 11
SPEECH_ID = N_RANKS + 14
BANNED = [N_RANKS + i for i in (11, 12, 13, 14, 15)]  # <|image|>, <|video|>, <|speech_start|>, <|speech|>, <|speech_end|>


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_tokenizer(tmp_path_factory.mktemp("tok")))


def reference_greedy(model, prompt: list[int], n: int, images=None) -> list[int]:
    """Whole-sequence forward at every step (no cache), media placeholders banned, argmax."""
    tokens = list(prompt)
    kwargs = {}
    if images:
        tiles = [[tile_image(im, 28, 2) for im in images]]
        kwargs["images"], kwargs["aspect_ratios"] = stack_images(tiles, 2)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([tokens]), **kwargs)[0, -1]
        logits[BANNED] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41], [7, 7, 7, 300, 12]]


def test_batched_greedy_equals_uncached_reference_for_prompts_of_different_lengths():
    model = text_model()
    out = Generator(model).generate([Prompt(p) for p in PROMPTS], SamplingConfig(max_new_tokens=12))
    for p, completion in zip(PROMPTS, out):
        assert completion.tokens == reference_greedy(model, p, 12)
        assert completion.finish_reason == "length" and completion.prompt_tokens == len(p)


def test_left_padded_prefill_logits_equal_single_prompt_logits():
    """Left padding is invisible: every row's next-token logits are the ones it gets alone."""
    model = text_model()
    decoder = Decoder(model)
    width = max(map(len, PROMPTS))
    pad = torch.tensor([width - len(p) for p in PROMPTS])
    tokens = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    valid = torch.arange(width)[None] >= pad[:, None]
    positions = (torch.arange(width)[None] - pad[:, None]).clamp(min=0)
    with torch.no_grad():
        batched = decoder(decoder.embed(tokens), positions, padded_attention_mask(valid, 0, width),
                          decoder.caches(len(PROMPTS), width), 0)
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(batched[i], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)


def test_legacy_generate_matches_generator():
    model = text_model()
    streamed = []
    new = generate(model, PROMPTS[0], max_new_tokens=8, on_token=streamed.append)
    assert new == reference_greedy(model, PROMPTS[0], 8) == streamed


def test_vision_batch_with_and_without_image_equals_reference():
    """Image K/V computed once and reused across cached steps; a text-only row in the same batch is unaffected."""
    model = vision_model()
    pic = picture(30, 50)  # a 1x2 tile grid
    with_image = [1, 2, IMAGE_ID, 5, 6, 7]
    text_only = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    calls = []
    encode = model.encode_images
    model.encode_images = lambda *a: calls.append(1) or encode(*a)
    out = Generator(model).generate([Prompt(with_image, [pic]), Prompt(text_only)], SamplingConfig(max_new_tokens=8))
    assert len(calls) == 1
    del model.encode_images
    assert out[0].tokens == reference_greedy(model, with_image, 8, [pic])
    assert out[1].tokens == reference_greedy(model, text_only, 8)
    # the image matters (gates are open), so this is not a text-only answer by accident
    assert out[0].tokens != reference_greedy(model, with_image, 8, [picture(30, 50, seed=5)])


def test_image_count_must_match_image_tokens_and_text_models_refuse_images():
    model = vision_model()
    with pytest.raises(ValueError, match="1 <\\|image\\|> tokens but 2 images"):
        Generator(model).generate([Prompt([1, IMAGE_ID, 3], [picture(), picture()])], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="no vision encoder"):
        Generator(text_model()).generate([Prompt([1, IMAGE_ID, 3], [picture()])], SamplingConfig(max_new_tokens=2))


def test_speech_embeddings_replace_placeholders():
    """Frames equal to the embeddings of tokens t give exactly the continuation of the prompt holding t."""
    model = text_model()
    words = [50, 51, 52]
    plain = [1, 2, *words, 3]
    with_placeholders = [1, 2, SPEECH_ID, SPEECH_ID, SPEECH_ID, 3]
    frames = model.tok_embeddings.weight[words].detach()
    gen = Generator(model)
    cfg = SamplingConfig(max_new_tokens=6)
    injected, reference = gen.generate([Prompt(with_placeholders, speech=frames), Prompt(plain)], cfg)
    assert injected.tokens == reference.tokens
    with pytest.raises(ValueError, match="3 <\\|speech\\|> placeholders but 2 speech frames"):
        gen.generate([Prompt(with_placeholders, speech=frames[:2])], cfg)


def test_media_placeholders_are_never_sampled():
    model = text_model()
    first = reference_greedy(model, PROMPTS[0], 1)[0]
    with torch.no_grad():  # make <|image|> the most likely next token by far
        model.output.weight[IMAGE_ID] = 10 * model.output.weight[first]
        assert int(model(torch.tensor([PROMPTS[0]]))[0, -1].argmax()) == IMAGE_ID
    out = Generator(model).generate([Prompt(PROMPTS[0])], SamplingConfig(max_new_tokens=4))[0]
    assert IMAGE_ID not in out.tokens and out.tokens[0] == first


def test_stop_tokens_end_each_row_independently():
    model = text_model()
    ref = [reference_greedy(model, p, 10) for p in PROMPTS]
    stop = ref[0][3]
    cfg = SamplingConfig(max_new_tokens=10, stop_tokens={stop})
    out = Generator(model).generate([Prompt(p) for p in PROMPTS], cfg)
    for r, completion in zip(ref, out):
        cut = r.index(stop) if stop in r else len(r)
        assert completion.tokens == r[:cut]
        assert completion.finish_reason == ("stop" if stop in r else "length")


def test_tokenizer_stop_tokens_are_the_default(tok):
    model = text_model()
    gen = Generator(model, tok)
    assert gen.stop_tokens == {tok.eos_id, tok.eom_id, tok.eot_id}
    first = reference_greedy(model, PROMPTS[1], 1)[0]
    with torch.no_grad():
        model.output.weight[tok.eot_id] = 10 * model.output.weight[first]
    out = gen.generate([Prompt(PROMPTS[1])], SamplingConfig(max_new_tokens=5))[0]
    assert out.tokens == [] and out.finish_reason == "stop" and out.text == ""


def test_stop_string_cuts_the_text_and_streaming_matches(tok):
    model = text_model()
    gen = Generator(model, tok)
    full = gen.generate([Prompt(PROMPTS[0])], SamplingConfig(max_new_tokens=16))[0]
    assert full.text == tok.decode(full.tokens)
    stop = tok.decode(full.tokens[8:10])
    at = full.text.index(stop)
    # the stop string is complete once token k is generated; nothing after it is produced
    k = next(j for j in range(len(full.tokens)) if stop in tok.decode(full.tokens[: j + 1]))
    assert k >= 2
    events = []
    out = gen.generate([Prompt(PROMPTS[0])], SamplingConfig(max_new_tokens=16, stop=(stop,)),
                       on_token=events.append)[0]
    assert out.text == full.text[:at] and out.finish_reason == "stop"
    assert out.tokens == full.tokens[: k + 1]
    assert "".join(e.text for e in events) == out.text
    assert len(events) == k + 1 and all(e.row == 0 for e in events)


def test_on_token_false_cancels_one_row():
    model = text_model()
    seen = []

    def on_token(event):
        if event.row == 0:
            seen.append(event.token)
            return len(seen) < 2

    out = Generator(model).generate([Prompt(p) for p in PROMPTS[:2]], SamplingConfig(max_new_tokens=8), on_token)
    assert out[0].finish_reason == "cancelled" and len(out[0].tokens) == 2
    assert out[1].tokens == reference_greedy(model, PROMPTS[1], 8)


def test_context_length_bounds():
    model = text_model(max_seq_len=16)
    gen = Generator(model)
    with pytest.raises(ContextLengthError, match="16 tokens; the model's context length is 16"):
        gen.generate([Prompt(list(range(1, 17)))], SamplingConfig(max_new_tokens=1))
    out = gen.generate([Prompt(list(range(1, 13)))], SamplingConfig(max_new_tokens=50))[0]
    assert len(out.tokens) == 4 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        gen.generate([Prompt([])], SamplingConfig())


def test_seeded_sampling_is_reproducible():
    model = text_model()
    gen = Generator(model)
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3)
    a = gen.generate([Prompt(PROMPTS[0])], cfg)[0].tokens
    b = gen.generate([Prompt(PROMPTS[0])], cfg)[0].tokens
    c = gen.generate([Prompt(PROMPTS[0])], SamplingConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=4))[0]
    assert a == b and a != c.tokens


# -- sampling ------------------------------------------------------------------------------------
LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def draws(n=20000, **kw):
    samples = sample_next(LOGITS.expand(n, 4), generator=torch.Generator().manual_seed(0), **kw)
    return torch.bincount(samples, minlength=4).float() / n


def test_greedy_and_degenerate_sampling_pick_the_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 0.0, 1.0]])
    assert sample_next(logits, 0.0).tolist() == [1, 0]
    assert sample_next(logits, 1.0, top_k=1).tolist() == [1, 0]
    assert sample_next(logits, 1.0, top_p=0.01).tolist() == [1, 0]


def test_temperature_top_k_and_top_p_distributions():
    assert torch.allclose(draws(temperature=1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.02)
    sharp = torch.softmax(LOGITS[0] / 0.5, -1)
    assert torch.allclose(draws(temperature=0.5), sharp, atol=0.02)
    top2 = draws(temperature=1.0, top_k=2)
    assert top2[2:].sum() == 0 and math.isclose(top2[0], 0.5 / 0.8, abs_tol=0.03)
    nucleus = draws(temperature=1.0, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: the third token is out
    assert nucleus[2:].sum() == 0 and math.isclose(nucleus[0], 0.5 / 0.8, abs_tol=0.03)
    wider = draws(temperature=1.0, top_p=0.81)
    assert wider[2] > 0 and wider[3] == 0


@pytest.mark.parametrize("bad, field", [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                                        (dict(top_k=0), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
                                        (dict(stop=("",)), "stop")])
def test_sampling_config_rejects_bad_values(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**bad)


# -- streaming text ------------------------------------------------------------------------------
def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tok):
    ids = tok.encode("Héllo 日本語 red square", bos=False, eos=False)
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.finish()]
    assert "".join(pieces) == "Héllo 日本語 red square"
    assert all("\ufffd" not in p for p in pieces)

    stream = TextStream(tok, stop=("red sq", "zzz"))
    out = "".join(stream.push(t) for t in ids) + stream.finish()
    assert out == stream.text == "Héllo 日本語 " and stream.stopped

    # a tail that looked like a stop string but was not is released at the end
    stream = TextStream(tok, stop=("square!",))
    out = "".join(stream.push(t) for t in ids)
    assert out == "Héllo 日本語 red " and stream.finish() == "square" and not stream.stopped


def test_text_stream_stop_string_inside_one_token(tok):
    ids = tok.encode("the quick brown fox", bos=False, eos=False)
    stream = TextStream(tok, stop=("ick",))
    out = "".join(stream.push(t) for t in ids) + stream.finish()
    assert out == "the qu" and stream.stopped


# -- media -----------------------------------------------------------------------------------------
def test_decode_image_bounds_pixels_before_decoding():
    data = png_bytes(picture(40, 50))
    assert decode_image(data, MediaLimits(max_image_pixels=2000)).size == (50, 40)
    with pytest.raises(MediaError, match="50x40 = 2000 pixels exceeds max_image_pixels=1999") as e:
        decode_image(data, MediaLimits(max_image_pixels=1999))
    assert e.value.limit == "max_image_pixels"
    with pytest.raises(MediaError, match="not a decodable image") as e:
        decode_image(b"GIF89a but not really", MediaLimits())
    assert e.value.limit is None


def wav(seconds: float, rate: int = 16000) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="WAV")
    return out.getvalue()


def test_decode_audio_bounds_duration():
    samples, rate = decode_audio(wav(0.5), MediaLimits(max_audio_seconds=1))
    assert rate == 16000 and samples.shape == (8000,)
    with pytest.raises(MediaError, match="2.0 s exceeds max_audio_seconds=1") as e:
        decode_audio(wav(2.0), MediaLimits(max_audio_seconds=1))
    assert e.value.limit == "max_audio_seconds"
    with pytest.raises(MediaError, match="not decodable audio"):
        decode_audio(b"RIFF....garbage", MediaLimits())


def test_capabilities_name_the_missing_encoder():
    assert Capabilities.of(vision_model()) == Capabilities(image=True)
    text = Capabilities.of(text_model())
    for kind, encoder in (("image", "vision"), ("audio", "speech"), ("video", "video")):
        with pytest.raises(UnsupportedInput, match=f"{kind} input is not supported by this model: it has no {encoder}"):
            text.require(kind)


# -- loading ---------------------------------------------------------------------------------------
def test_composed_checkpoint_round_trip_and_key_check(tmp_path):
    model = vision_model()
    config = ModelConfig(name="v", lm=lm_args(), vision=vision_config())
    save_multimodal(model, config, tmp_path / "v")
    loaded, name = load_model(tmp_path / "v")
    assert name == "v" and type(loaded).__name__ == "MultimodalModel"
    tokens = torch.tensor([[1, IMAGE_ID, 4, 5]])
    images, ratios = stack_images([[tile_image(picture(), 28, 2)]], 2)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, images=images, aspect_ratios=ratios),
                           model(tokens, images=images, aspect_ratios=ratios))
    # a text LM's weights under a vision config: the error names the file and the missing keys
    from mm_llama.checkpoint.native import write_safetensors
    write_safetensors(text_model().state_dict(), tmp_path / "v" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"v/model.safetensors: state dict does not match.*missing keys"):
        load_model(tmp_path / "v")


def test_text_checkpoint_and_tokenizer_discovery(tmp_path, tok):
    tokenizer_file = make_tokenizer(tmp_path)
    folder = text_checkpoint(tmp_path / "t", tokenizer_file)
    model, name = load_model(folder)
    assert name == "tiny-text" and model.args.vocab_size == VOCAB
    assert find_tokenizer(folder).n_words == tok.n_words
    (folder / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer found.*pass --tokenizer"):
        find_tokenizer(folder)
    assert find_tokenizer(folder, tokenizer_file).n_words == tok.n_words


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_the_blocks(dtype):
    """`Decoder.step` (fewer ops) computes what the model's blocks compute, for the prompt and the next token,
    padded batch included."""
    model = text_model().to(dtype)
    decoder = Decoder(model)
    lengths, width, extra = [5, 3], 5, 2
    pad = torch.tensor([width - n for n in lengths])
    valid = torch.arange(width + extra)[None, :] >= pad[:, None]
    tokens = torch.randint(0, 300, (2, width), generator=torch.Generator().manual_seed(3))
    positions = (torch.arange(width)[None, :] - pad[:, None]).clamp(min=0)
    with torch.inference_mode():
        logits = {}
        for how in ("blocks", "step"):
            caches = decoder.caches(2, width + extra)
            step = decoder.step if how == "step" else decoder
            prompt = step(decoder.embed(tokens), positions, padded_attention_mask(valid, 0, width), caches, 0)
            nxt = torch.tensor([[7], [9]])
            mask = padded_attention_mask(valid, width, 1)
            logits[how] = torch.cat([prompt, step(decoder.embed(nxt), torch.tensor(lengths)[:, None], mask, caches,
                                                  width)])
            causal = step(decoder.embed(tokens[:1]), torch.arange(width)[None], AttentionMask(),
                          decoder.caches(1, width), 0)  # no padding: SDPA's causal path
            logits[how] = torch.cat([logits[how], causal])
    assert logits["step"].shape == (5, model.args.vocab_size)
    # fp32: equal up to rounding (the fused rms_norm rounds once where the training norm rounds twice)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits["step"], logits["blocks"], rtol=tol, atol=tol)


@pytest.mark.slow  # compiling the decode step takes minutes on a busy 2-core machine
def test_compiled_decode_step_gives_the_same_tokens():
    """`Generator(compile=True)`: fixed-shape steps over a rounded cache, padded batch, one graph for both calls."""
    model = text_model()
    config = SamplingConfig(max_new_tokens=10)
    compiled = Generator(model, compile=True)
    for prompts in ([Prompt([1, 2, 3, 4, 5]), Prompt([7, 8, 9])], [Prompt([4, 5, 6, 7]), Prompt([9])]):
        expected = [c.tokens for c in Generator(model).generate(prompts, config)]
        assert [c.tokens for c in compiled.generate(prompts, config)] == expected

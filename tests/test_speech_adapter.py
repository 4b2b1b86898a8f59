"""The speech adapter and the splice into the LM's embeddings: frame counts, exact placement, bad inputs."""
from __future__ import annotations

import pytest
import torch

from adapters.speech import SpeechAdapter, speech_spans, splice_speech
from encoders.speech.conformer import ConformerEncoder
from encoders.speech.features import features
from mm_llama.config.speech import SpeechAdapterArgs, SpeechConfig, SpeechTokenIds
from mm_llama.text import ChatFormat, Tokenizer

CFG = SpeechConfig(
    encoder={"n_mels": 80, "dim": 32, "n_layers": 1, "n_heads": 4, "ffn_dim": 48, "dropout": 0.0},
    adapter={"dim": 48, "n_heads": 4, "ffn_dim": 64},
)
LM_DIM = 24
IDS = SpeechTokenIds(start=1, speech=2, end=3)


def modules(seed: int = 0) -> tuple[ConformerEncoder, SpeechAdapter]:
    torch.manual_seed(seed)
    return ConformerEncoder(CFG.encoder), SpeechAdapter(CFG.encoder.dim, CFG.adapter, LM_DIM)


@pytest.mark.parametrize("n_samples, rate", [(480, 16_000), (1_000, 16_000), (16_000, 16_000), (16_161, 16_000),
                                             (23_999, 16_000), (8_000, 8_000), (7_777, 44_100)])
def test_adapter_frames_rule_matches_the_modules(n_samples, rate):
    encoder, adapter = modules()
    wave = torch.sin(torch.arange(n_samples) * 0.05)
    feats = features(wave, rate, CFG.frontend)[None]
    out, lengths = adapter(*encoder(feats))
    assert out.shape == (1, CFG.adapter_frames(n_samples, rate), LM_DIM) and lengths.item() == out.shape[1]


def test_adapter_frames_at_the_paper_scale():
    cfg = SpeechConfig()
    assert cfg.adapter_frames(60 * 16_000) == 750  # 60 s: 6,001 mel frames → 1,500 encoder frames (40 ms) → 750 (80 ms)
    assert cfg.adapter_frames(16_000) == 13 and cfg.adapter_frames(200) == 0 and cfg.adapter_frames(480) == 1


def test_adapter_padded_batch_equals_unpadded():
    _, adapter = modules()
    a, b = torch.randn(1, 9, 32), torch.randn(1, 4, 32)
    padded = torch.full((2, 9, 32), 7.0)
    padded[0], padded[1, :4] = a[0], b[0]
    out, lengths = adapter(padded, torch.tensor([9, 4]))
    assert lengths.tolist() == [5, 2] and out.shape == (2, 5, LM_DIM)
    torch.testing.assert_close(out[0], adapter(a)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :2], adapter(b)[0][0], atol=1e-5, rtol=1e-5)
    assert out[1, 2:].abs().sum() == 0


def test_paper_adapter_is_about_100m_parameters():
    with torch.device("meta"):
        adapter = SpeechAdapter(1536, SpeechAdapterArgs(), lm_dim=4096)
    n = sum(p.numel() for p in adapter.parameters())
    assert n == 89_692_160  # SPEC §5.4: ≈ 90M for an 8B LM ("about 100M")
    assert adapter.conv.kernel_size == (3,) and adapter.conv.stride == (2,)


def test_splice_places_frames_exactly_between_the_speech_tokens():
    tokens = torch.tensor([
        [9, 1, 2, 2, 2, 3, 8, 1, 2, 3],
        [7, 7, 7, 1, 2, 2, 3, 0, 0, 0],
    ])
    emb = torch.randn(2, 10, 4)
    speech = torch.randn(3, 5, 4)
    lengths = torch.tensor([3, 1, 2])
    out = splice_speech(emb, tokens, speech, lengths, IDS)
    torch.testing.assert_close(out[0, 2:5], speech[0, :3])
    torch.testing.assert_close(out[0, 8], speech[1, 0])
    torch.testing.assert_close(out[1, 4:6], speech[2, :2])
    keep = tokens != IDS.speech
    assert torch.equal(out[keep], emb[keep])
    assert speech_spans(tokens, IDS) == [(0, 2, 5), (0, 8, 9), (1, 4, 6)]


def test_splice_is_differentiable_in_the_speech_frames():
    tokens = torch.tensor([[1, 2, 2, 3]])
    speech = torch.randn(1, 2, 4, requires_grad=True)
    splice_speech(torch.zeros(1, 4, 4), tokens, speech, torch.tensor([2]), IDS).sum().backward()
    torch.testing.assert_close(speech.grad, torch.ones(1, 2, 4))


def test_text_only_input_is_unchanged():
    tokens = torch.tensor([[5, 6, 7, 8]])
    emb = torch.randn(1, 4, 4)
    assert splice_speech(emb, tokens, None, None, IDS) is emb


@pytest.mark.parametrize("tokens, speech, lengths, message", [
    ([[1, 2, 2, 3]], torch.randn(1, 3, 4), [3],
     r"clip 0 has 3 adapter frames but its <\|speech\|> span \(row 0, positions 1..2\) has 2"),
    ([[1, 2, 2, 3]], None, None, "1 <\\|speech\\|> spans but 0 audio clips"),
    ([[5, 6, 7, 8]], torch.randn(1, 3, 4), [3], "0 <\\|speech\\|> spans but 1 audio clips"),
    ([[1, 2, 3, 1, 2, 3]], torch.randn(1, 1, 4), [1], "2 <\\|speech\\|> spans but 1 audio clips"),
    ([[0, 2, 2, 3]], torch.randn(1, 2, 4), [2], "positions 1..2 are not enclosed"),
    ([[1, 2, 2, 0]], torch.randn(1, 2, 4), [2], "not enclosed"),
    ([[2, 2, 3, 0]], torch.randn(1, 2, 4), [2], "not enclosed"),
    ([[1, 2, 2, 3]], torch.randn(1, 2, 5), [2], "speech frames have width 5 but the embeddings 4"),
])
def test_splice_rejects_mismatches_clearly(tokens, speech, lengths, message):
    with pytest.raises(ValueError, match=message):
        splice_speech(torch.randn(1, len(tokens[0]), 4), torch.tensor(tokens), speech,
                      None if lengths is None else torch.tensor(lengths), IDS)


def test_chat_format_placeholders_take_the_adapter_output():
    """End to end: audio → encoder → adapter; the chat format's placeholders get exactly those frames."""
    tokenizer = Tokenizer({bytes([b]): b for b in range(256)})
    ids = CFG.token_ids_for(256 + 256)
    assert ids == (tokenizer.speech_start_id, tokenizer.speech_id, tokenizer.speech_end_id)
    waves = [torch.sin(torch.arange(n) * 0.03) for n in (5_000, 2_400)]
    frames = [CFG.adapter_frames(w.shape[0]) for w in waves]
    dialog = ChatFormat(tokenizer).encode_dialog([{"role": "user", "content": [
        {"type": "text", "text": "Hi"}, {"type": "audio", "frames": frames[0]}, {"type": "audio", "frames": frames[1]}]}])
    tokens = torch.tensor([dialog.tokens])
    encoder, adapter = modules()
    feats = torch.nn.utils.rnn.pad_sequence([features(w, 16_000, CFG.frontend) for w in waves], batch_first=True)
    lengths = torch.tensor([features(w, 16_000, CFG.frontend).shape[0] for w in waves])
    speech, speech_lengths = adapter(*encoder(feats, lengths))
    assert speech_lengths.tolist() == frames
    emb = torch.randn(1, tokens.shape[1], LM_DIM)
    out = splice_speech(emb, tokens, speech, speech_lengths, ids)
    where = (tokens[0] == ids.speech).nonzero().squeeze(1)
    torch.testing.assert_close(out[0, where], torch.cat([speech[0, :frames[0]], speech[1, :frames[1]]]))
    assert torch.equal(out[0, tokens[0] != ids.speech], emb[0, tokens[0] != ids.speech])

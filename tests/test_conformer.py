"""The Conformer speech encoder: shapes, padding invariance, rotary relative positions, the paper's 1B size, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from encoders.speech.args import ConformerArgs
from encoders.speech.conformer import ConformerEncoder, RotarySelfAttention, rotary_frequencies, stack_frames
from mm_llama.config.speech import SpeechConfig
from mm_llama.model.rope import rotary_tables

TINY = ConformerArgs(n_mels=8, stack=4, dim=32, n_layers=2, n_heads=4, ffn_dim=48, conv_kernel=7, dropout=0.0)
CONFIGS = Path(__file__).parents[1] / "configs" / "models"


def tiny_encoder(seed: int = 0) -> ConformerEncoder:
    torch.manual_seed(seed)
    return ConformerEncoder(TINY)


def test_stacking_concatenates_four_frames():
    feats = torch.arange(2 * 10 * 3, dtype=torch.float).view(2, 10, 3)
    out = stack_frames(feats, 4)
    assert out.shape == (2, 2, 12)
    torch.testing.assert_close(out[1, 1], feats[1, 4:8].flatten())


def test_shapes_and_lengths():
    enc = tiny_encoder()
    out, lengths = enc(torch.randn(3, 41, 8), torch.tensor([41, 20, 7]))
    assert out.shape == (3, 10, 32) and lengths.tolist() == [10, 5, 1]
    assert out[1, 5:].abs().sum() == 0 and out[2, 1:].abs().sum() == 0
    out, lengths = enc(torch.randn(1, 16, 8))
    assert out.shape == (1, 4, 32) and lengths.tolist() == [4]


@pytest.mark.parametrize("train", [False, True])
def test_padded_batch_equals_unpadded(train):
    enc = tiny_encoder().train(train)
    a, b = torch.randn(1, 40, 8), torch.randn(1, 22, 8)
    batch = torch.zeros(2, 40, 8)
    batch[0], batch[1, :22] = a[0], b[0]
    batch[1, 22:] = 123.0  # garbage in the padding must not leak into real frames
    out, lengths = enc(batch, torch.tensor([40, 22]))
    torch.testing.assert_close(out[0], enc(a)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :5], enc(b)[0][0], atol=1e-5, rtol=1e-5)


def test_rotary_attention_depends_only_on_relative_positions():
    torch.manual_seed(0)
    attn = RotarySelfAttention(32, 4, 0.0)
    x = torch.randn(2, 9, 32)
    freqs = rotary_frequencies(8, 10_000.0)

    def run(positions):
        cos, sin = rotary_tables(positions, freqs)
        return attn(x, cos, sin, None)

    pos = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(run(pos), run(pos + 1000), atol=1e-4, rtol=1e-4)
    # but positions matter: reversing them changes the result
    assert (run(pos) - run(pos.flip(-1))).abs().max() > 1e-2
    # the score q·k of rotated vectors is a function of m − n
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    from mm_llama.model.rope import apply_rotary

    def score(m, n):
        cm, sm = rotary_tables(torch.tensor([[m]]), freqs)
        cn, sn = rotary_tables(torch.tensor([[n]]), freqs)
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum()

    torch.testing.assert_close(score(3, 1), score(103, 101), atol=1e-5, rtol=1e-5)
    assert abs(score(3, 1) - score(1, 3)) > 1e-3


def test_encoder_output_is_not_permutation_invariant():
    """Rotary positions reach the encoder: reversing the frames is not the same as reversing the outputs."""
    enc = tiny_encoder()
    feats = torch.randn(1, 32, 8)
    out = enc(feats)[0]
    reversed_in = stack_frames(feats, 4).flip(1).reshape(1, 32, 8)
    assert (enc(reversed_in)[0].flip(1) - out).abs().max() > 1e-3


def test_paper_1b_encoder_parameter_count_on_meta_device():
    cfg = SpeechConfig()
    with torch.device("meta"):
        enc = ConformerEncoder(cfg.encoder)
    per_layer = sum(p.numel() for p in enc.layers[0].parameters())
    total = sum(p.numel() for p in enc.parameters())
    assert per_layer == 41_733_632  # SPEC §5.2: about 41.7M per layer
    assert total == 1_002_100_224  # the paper: "1B parameters"
    e = cfg.encoder
    assert (e.n_layers, e.dim, e.ffn_dim, e.n_heads, e.conv_kernel) == (24, 1536, 4096, 24, 7)


def test_encoder_rejects_bad_inputs():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"\[batch, frames, 8\]"):
        enc(torch.randn(1, 16, 80))
    with pytest.raises(ValueError, match="at least 4 feature frames"):
        enc(torch.randn(2, 16, 8), torch.tensor([16, 3]))


def test_conformer_args_validation():
    with pytest.raises(ValidationError, match="even integer"):
        ConformerArgs(dim=30, n_heads=4)
    with pytest.raises(ValidationError, match="conv_kernel must be odd"):
        ConformerArgs(conv_kernel=8)
    with pytest.raises(ValidationError, match="extra"):
        ConformerArgs(layers=3)


@pytest.mark.parametrize("name", ["speech_tiny", "speech_1b_encoder"])
def test_model_config_fragments_validate(name):
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg = SpeechConfig.model_validate(data["speech"])
    assert data["name"] == name and cfg.frontend.n_mels == cfg.encoder.n_mels == 80
    assert cfg.token_ids_for(data["lm"]["vocab_size"]) == (data["lm"]["vocab_size"] - 256 + 13,
                                                          data["lm"]["vocab_size"] - 256 + 14,
                                                          data["lm"]["vocab_size"] - 256 + 15)


def test_speech_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="encoder.n_mels"):
        SpeechConfig(encoder={"n_mels": 40})
    with pytest.raises(ValidationError, match="adapter"):
        SpeechConfig(adapter={"widht": 3})
    with pytest.raises(ValueError, match="speech_id 9000 is outside"):
        SpeechConfig(speech_id=9000).token_ids_for(4352)

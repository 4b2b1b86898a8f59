"""Logit parity with `transformers.LlamaForCausalLM` on the same weights, both directions.

GQA, Llama 3.1 rope scaling on and off, tied embeddings, sharded files. The scaled cases use a small
`original_max_position_embeddings` (32) and 96-token sequences, so the scaling changes the logits
(checked: the same weights without scaling disagree).
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mm_llama import from_pretrained
from mm_llama.checkpoint import hf_config_from_args, save_hf, save_native
from mm_llama.cli import main as cli
from mm_llama.config import ModelConfig
from mm_llama.model import LlamaArgs, Transformer

TOL = 1e-4
SEQ = 96
CASES = {
    "gqa_scaled": dict(n_heads=4, n_kv_heads=2, use_scaled_rope=True, tie_embeddings=False),
    "gqa_unscaled": dict(n_heads=4, n_kv_heads=2, use_scaled_rope=False, tie_embeddings=False),
    # Llama 3.2 1B/3B use factor 32; other band edges too, so each scaling field must carry over.
    "mha_scaled32_tied": dict(n_heads=4, n_kv_heads=4, use_scaled_rope=True, tie_embeddings=True,
                              rope_scale_factor=32.0, rope_low_freq_factor=2.0, rope_high_freq_factor=8.0),
    "mqa_unscaled_tied": dict(n_heads=8, n_kv_heads=1, use_scaled_rope=False, tie_embeddings=True),
}


def tiny_args(**case) -> LlamaArgs:
    base = dict(dim=64, n_layers=2, vocab_size=256, multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                rope_theta=10000.0, rope_scale_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                rope_original_context=32, max_seq_len=256)
    return LlamaArgs(**{**base, **case})


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every tensor random (norm weights around 1), so a swapped or unpermuted key shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.2 * noise if "norm" in name else 0.08 * noise)


def tokens(vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(7))


def hf_logits(folder, x) -> torch.Tensor:
    reference = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return reference(input_ids=x).logits


def ours(args: LlamaArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    randomize(model, seed)
    return model.eval()


def theirs(args: LlamaArgs, seed: int = 0) -> LlamaForCausalLM:
    """A random `transformers` model built from its own config class (not from our export)."""
    rope_scaling = None
    if args.use_scaled_rope:
        rope_scaling = {"rope_type": "llama3", "factor": args.rope_scale_factor,
                        "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                        "original_max_position_embeddings": args.rope_original_context}
    config = LlamaConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                         num_attention_heads=args.n_heads, num_key_value_heads=args.kv_heads,
                         vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                         rope_scaling=rope_scaling, max_position_embeddings=args.max_seq_len,
                         tie_word_embeddings=args.tie_embeddings)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("case", CASES)
def test_exported_weights_give_transformers_our_logits(tmp_path, case):
    model = ours(tiny_args(**CASES[case]))
    save_hf(model, tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    assert (hf_logits(tmp_path / "hf", x) - expected).abs().max() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_transformers_weights_give_us_their_logits(tmp_path, case):
    args = tiny_args(**CASES[case])
    reference = theirs(args, seed=1)
    reference.save_pretrained(tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        expected = reference(input_ids=x).logits
    model = from_pretrained(tmp_path / "hf")
    assert model.args.tie_embeddings == args.tie_embeddings and model.args.use_scaled_rope == args.use_scaled_rope
    with torch.no_grad():
        assert (model(x) - expected).abs().max() <= TOL


def test_rope_scaling_matters_at_this_length(tmp_path):
    """Guards the scaled cases above: without scaling the same weights give clearly different logits."""
    args = tiny_args(**CASES["gqa_scaled"])
    reference = theirs(args, seed=2)
    reference.save_pretrained(tmp_path / "hf")
    x = tokens()
    with torch.no_grad():
        expected = reference(input_ids=x).logits
    model = from_pretrained(tmp_path / "hf")
    unscaled = Transformer(args.model_copy(update={"use_scaled_rope": False}))
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (unscaled(x) - expected).abs().max() > 100 * TOL
        assert (model(x) - expected).abs().max() <= TOL


def test_sharded_files_both_directions(tmp_path):
    args = tiny_args(**CASES["gqa_scaled"])
    x = tokens()
    model = ours(args, seed=3)
    save_hf(model, tmp_path / "ours", max_shard_bytes=80_000)
    assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 2
    with torch.no_grad():
        assert (hf_logits(tmp_path / "ours", x) - model(x)).abs().max() <= TOL

    reference = theirs(args, seed=4)
    reference.save_pretrained(tmp_path / "theirs", max_shard_size="60KB")
    assert (tmp_path / "theirs" / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert (from_pretrained(tmp_path / "theirs")(x) - reference(input_ids=x).logits).abs().max() <= TOL


def test_our_config_json_is_what_transformers_reads():
    args = tiny_args(**CASES["gqa_scaled"])
    config = LlamaConfig.from_dict(hf_config_from_args(args))
    shape = (config.hidden_size, config.intermediate_size, config.num_key_value_heads, config.head_dim)
    assert shape == (64, 224, 2, 16)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    assert config.rope_parameters["original_max_position_embeddings"] == 32


def test_convert_cli_output_loads_in_transformers(tmp_path):
    model = ours(tiny_args(**CASES["mha_scaled32_tied"]), seed=5)
    save_native(model, ModelConfig(name="tiny", lm=model.args), tmp_path / "native")
    assert cli(["convert", str(tmp_path / "native"), str(tmp_path / "meta"), "--to", "meta", "--shards", "2"]) == 0
    assert cli(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf", "--shards", "2"]) == 0
    x = tokens()
    with torch.no_grad():
        assert (hf_logits(tmp_path / "hf", x) - model(x)).abs().max() <= TOL

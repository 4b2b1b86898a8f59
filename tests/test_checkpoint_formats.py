"""Checkpoint layouts (native, Meta, Hugging Face): exact round trips, layout detection, atomic
writes, `mm-llama convert`, and a clear error for every bad input a user will hand us."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mm_llama
from mm_llama.checkpoint import (
    CheckpointError,
    args_from_hf_config,
    args_from_params,
    detect_layout,
    from_hf_state_dict,
    from_pretrained,
    hf_config_from_args,
    latest_checkpoint,
    load_hf,
    load_meta,
    load_native,
    run_dir_model,
    save_hf,
    save_meta,
    save_native,
    to_hf_state_dict,
)
from mm_llama.checkpoint import native as native_module
from mm_llama.checkpoint.hf import ffn_rule, hf_to_meta_rows, meta_to_hf_rows
from mm_llama.cli import main as cli
from mm_llama.config import ConfigError, ModelConfig
from mm_llama.model import LlamaArgs, Transformer

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, ffn_dim_multiplier=1.3,
            norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, rope_original_context=32, max_seq_len=256)


def make_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model whose every tensor (norms too) is random, so no two keys can be confused."""
    model = Transformer(LlamaArgs(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def config_of(model: Transformer, name: str = "tiny") -> ModelConfig:
    return ModelConfig(name=name, lm=model.args)


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


TOKENS = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- native


def test_native_round_trip_is_exact(tmp_path):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary sibling left behind
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask  # readable like any folder
    loaded, config = load_native(tmp_path / "ckpt")
    assert config == config_of(model)
    assert_same_weights(model, loaded)
    assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_native_tied_embeddings_stored_once_and_still_tied(tmp_path):
    model = make_model(tie_embeddings=True)
    save_native(model, config_of(model), tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / "model.safetensors", "pt") as f:
        assert "output.weight" not in f.keys() and "tok_embeddings.weight" in f.keys()
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_native_dtype_cast_on_load(tmp_path):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "ckpt")
    loaded = from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.norm.weight, model.norm.weight.bfloat16())
    assert not loaded.training


def test_run_dir_loads_highest_complete_step_and_ignores_leftovers(tmp_path):
    run = tmp_path / "run"
    for step, seed in ((10, 1), (200, 2), (30, 3)):
        model = make_model(seed)
        save_native(model, config_of(model), run / "checkpoints" / f"step_{step:08d}")
        (run / "checkpoints" / f"step_{step:08d}" / "optimizer.pt").write_bytes(b"ignored")
    # A save killed midway leaves a hidden temporary folder; a stray folder lacks model.yaml.
    (run / "checkpoints" / ".step_00000900.tmp-abc123").mkdir()
    (run / "checkpoints" / ".step_00000900.tmp-abc123" / "model.safetensors").write_bytes(b"\x00" * 10)
    (run / "checkpoints" / "step_00000950").mkdir()
    (run / "checkpoints" / "step_00000950" / "model.safetensors").write_bytes(b"partial")
    assert detect_layout(run) == "run"
    assert latest_checkpoint(run).name == "step_00000200"
    assert_same_weights(mm_llama.from_pretrained(run), make_model(2))
    # The engine's stage output (`final/`, maybe a Polyak average) wins once it is complete.
    (run / ".tmp-final-123").mkdir()
    assert_same_weights(mm_llama.from_pretrained(run), make_model(2))
    final = make_model(4)
    save_native(final, config_of(final), run / "final")
    assert run_dir_model(run).name == "final"
    assert_same_weights(mm_llama.from_pretrained(run), final)


def test_run_dir_without_complete_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints" / ".step_00000005.tmp-x").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no complete step_"):
        from_pretrained(tmp_path / "run")


def test_failed_save_leaves_previous_folder_intact_and_no_partial(tmp_path, monkeypatch):
    old = make_model(1)
    save_native(old, config_of(old), tmp_path / "ckpt")

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(native_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_native(make_model(2), config_of(old), tmp_path / "ckpt")
    with pytest.raises(OSError, match="disk full"):
        save_native(make_model(2), config_of(old), tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no 'fresh', no temporary folders
    assert_same_weights(load_native(tmp_path / "ckpt")[0], old)


def test_save_replaces_an_existing_folder_completely(tmp_path):
    save_native(make_model(1), config_of(make_model(1)), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("from the old save")
    new = make_model(2)
    save_native(new, config_of(new), tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["model.safetensors", "model.yaml"]
    assert_same_weights(load_native(tmp_path / "ckpt")[0], new)


def test_save_native_rejects_a_config_that_does_not_describe_the_model(tmp_path):
    model = make_model()
    wrong = ModelConfig(name="x", lm=model.args.model_copy(update={"n_layers": 3}))
    with pytest.raises(CheckpointError, match="does not describe the model"):
        save_native(model, wrong, tmp_path / "ckpt")


# ---------------------------------------------------------------- native: bad inputs


def test_native_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_native(tmp_path / "nowhere")
    model = make_model()
    save_native(model, config_of(model), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_native(tmp_path / "ckpt")
    save_native(model, config_of(model), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="model.yaml"):
        load_native(tmp_path / "ckpt")


def test_native_truncated_safetensors(tmp_path):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        from_pretrained(tmp_path / "ckpt")
    weights.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        from_pretrained(tmp_path / "ckpt")


def test_native_shape_mismatch_names_key_and_both_shapes(tmp_path):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "ckpt")
    yaml = tmp_path / "ckpt" / "model.yaml"
    yaml.write_text(yaml.read_text().replace("vocab_size: 128", "vocab_size: 256"))
    message = r"'tok_embeddings.weight' has shape \(128, 64\) but the config expects \(256, 64\)"
    with pytest.raises(CheckpointError, match=message):
        load_native(tmp_path / "ckpt")


def test_native_missing_and_unexpected_keys_are_listed(tmp_path):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "ckpt")
    state = dict(model.state_dict())
    del state["norm.weight"], state["layers.1.ffn_norm.weight"]
    state["layers.2.attention.wq.weight"] = torch.zeros(64, 64)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_native(tmp_path / "ckpt")
    msg = str(e.value)
    assert "missing keys ['layers.1.ffn_norm.weight', 'norm.weight']" in msg
    assert "unexpected keys ['layers.2.attention.wq.weight']" in msg


def test_native_malformed_model_yaml(tmp_path):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "ckpt")
    yaml = tmp_path / "ckpt" / "model.yaml"
    yaml.write_text(yaml.read_text().replace("n_heads:", "n_hedas:"))
    with pytest.raises(ConfigError, match=r"model\.yaml.*n_hedas"):
        load_native(tmp_path / "ckpt")


# ---------------------------------------------------------------- Meta


@pytest.mark.parametrize("num_shards", [1, 2])
def test_meta_round_trip_is_exact(tmp_path, num_shards):
    model = make_model()
    save_meta(model, tmp_path / "meta", num_shards=num_shards)
    files = sorted(os.listdir(tmp_path / "meta"))
    assert files == [f"consolidated.{i:02d}.pth" for i in range(num_shards)] + ["params.json"]
    loaded = load_meta(tmp_path / "meta")
    assert loaded.args == model.args
    assert_same_weights(model, loaded)


def test_meta_shards_split_as_metas_model_parallel_layers(tmp_path):
    model = make_model()
    save_meta(model, tmp_path / "meta", num_shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    full = model.state_dict()
    assert torch.equal(shard["layers.0.attention.wq.weight"], full["layers.0.attention.wq.weight"][32:])
    assert torch.equal(shard["layers.0.attention.wk.weight"], full["layers.0.attention.wk.weight"][16:])
    assert torch.equal(shard["layers.0.attention.wo.weight"], full["layers.0.attention.wo.weight"][:, 32:])
    assert torch.equal(shard["layers.1.feed_forward.w2.weight"], full["layers.1.feed_forward.w2.weight"][:, 112:])
    assert torch.equal(shard["layers.1.feed_forward.w3.weight"], full["layers.1.feed_forward.w3.weight"][112:])
    assert torch.equal(shard["tok_embeddings.weight"], full["tok_embeddings.weight"][64:])
    assert torch.equal(shard["output.weight"], full["output.weight"][64:])
    assert torch.equal(shard["layers.0.ffn_norm.weight"], full["layers.0.ffn_norm.weight"])


def test_hand_built_two_shard_meta_folder_merges(tmp_path):
    """Slices written by hand, as two fairscale ranks would hold them (no code of ours involved)."""
    model = make_model()
    full = model.state_dict()
    column = ("wq", "wk", "wv", "w1", "w3")
    shards = [{}, {}]
    for key, t in full.items():
        layer_name = key.split(".")[-2]
        for rank in (0, 1):
            if key in ("tok_embeddings.weight", "output.weight") or layer_name in column:
                half = t.shape[0] // 2
                shards[rank][key] = t[rank * half:(rank + 1) * half].clone()
            elif layer_name in ("wo", "w2"):
                half = t.shape[1] // 2
                shards[rank][key] = t[:, rank * half:(rank + 1) * half].clone()
            else:
                shards[rank][key] = t.clone()
    folder = tmp_path / "meta"
    folder.mkdir()
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "multiple_of": 32,
              "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
              "rope_original_context": 32}
    (folder / "params.json").write_text(json.dumps(params))
    for rank in (0, 1):
        torch.save(shards[rank], folder / f"consolidated.{rank:02d}.pth")
    assert detect_layout(folder) == "meta"
    loaded = from_pretrained(folder)
    assert_same_weights(model, loaded)
    assert loaded.args.max_seq_len == 131072  # absent from Meta's params.json: the 3.1 context length
    assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_meta_tied_embeddings(tmp_path):
    model = make_model(tie_embeddings=True)
    save_meta(model, tmp_path / "meta", num_shards=2)
    # Meta's reference model always has an output matrix, so the shared one is written twice.
    assert "output.weight" in torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    loaded = load_meta(tmp_path / "meta")
    assert loaded.args.tie_embeddings and loaded.output.weight is loaded.tok_embeddings.weight
    assert torch.equal(loaded(TOKENS), model(TOKENS))


def test_meta_params_json_mapping():
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    args = args_from_params(params)
    assert (args.hidden_dim, args.kv_heads, args.max_seq_len) == (14336, 8, 131072)
    assert (args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
            args.rope_original_context) == (8.0, 1.0, 4.0, 8192)
    assert args_from_params({**params, "use_scaled_rope": False}).max_seq_len == 8192
    vision = {**params, "vision_chunk_size": 560, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 8}
    with pytest.warns(UserWarning, match="vision_chunk_size.*not the language model"):
        assert args_from_params(vision) == args
    with pytest.raises(ConfigError, match="params.json.*unknown key 'n_layer'"):
        args_from_params({**params, "n_layer": 3}, "params.json")
    with pytest.raises(ConfigError, match="missing required key 'dim'"):
        args_from_params({k: v for k, v in params.items() if k != "dim"})


def test_meta_vision_checkpoint_loads_its_language_model(tmp_path):
    model = make_model()
    state = {f"text_model.{k}": v for k, v in model.state_dict().items()}
    state["text_model.learnable_embedding.weight"] = torch.zeros(8, 64)
    state["text_model.cross_attention_layers.0.gate_attn"] = torch.zeros(1)
    state["vision_model.vision_projection.weight"] = torch.zeros(64, 16)
    folder = tmp_path / "vision"
    folder.mkdir()
    params = {**TINY, "vision_chunk_size": 448, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 1}
    (folder / "params.json").write_text(json.dumps(params))
    torch.save(state, folder / "consolidated.00.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_meta(folder)
    messages = " ".join(str(w.message) for w in caught)
    assert "vision_chunk_size" in messages and "vision_model.*" in messages
    assert_same_weights(model, loaded)


def test_meta_bad_inputs(tmp_path):
    model = make_model()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_meta(tmp_path / "nowhere")
    save_meta(model, tmp_path / "m", num_shards=2)
    folder = tmp_path / "m"

    (folder / "params.json").write_text("{'dim': 64,")
    with pytest.raises(CheckpointError, match=r"params\.json: not valid JSON"):
        load_meta(folder)
    (folder / "params.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"params\.json: expected a JSON object"):
        load_meta(folder)
    (folder / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"params\.json"):
        load_meta(folder)

    save_meta(model, folder, num_shards=2)
    params = json.loads((folder / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, "moe_experts": 8}))
    with pytest.raises(ConfigError, match="unknown key 'moe_experts'"):
        load_meta(folder)

    save_meta(model, folder, num_shards=2)
    shard = folder / "consolidated.01.pth"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: not a readable PyTorch checkpoint"):
        load_meta(folder)

    save_meta(model, folder, num_shards=2)
    os.rename(folder / "consolidated.01.pth", folder / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match=r"missing model-parallel shards \['consolidated\.01\.pth'\]"):
        load_meta(folder)

    save_meta(model, folder, num_shards=2)
    state = torch.load(folder / "consolidated.01.pth", weights_only=True)
    del state["layers.0.ffn_norm.weight"]
    torch.save(state, folder / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.01\.pth: missing key 'layers.0.ffn_norm.weight'"):
        load_meta(folder)

    save_meta(model, folder, num_shards=1)
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wq.weight"] = state["layers.0.attention.wq.weight"][:32]
    torch.save(state, folder / "consolidated.00.pth")
    message = r"'layers.0.attention.wq.weight' has shape \(32, 64\) but the config expects \(64, 64\)"
    with pytest.raises(CheckpointError, match=message):
        load_meta(folder)

    state = {k: v for k, v in model.state_dict().items() if k != "layers.1.attention.wv.weight"}
    state["layers.0.attention.bias"] = torch.zeros(64)
    torch.save(state, folder / "consolidated.00.pth")
    message = r"missing keys \['layers.1.attention.wv.weight'\]; unexpected keys \['layers.0.attention.bias'\]"
    with pytest.raises(CheckpointError, match=message):
        load_meta(folder)


def test_save_meta_rejects_indivisible_shards(tmp_path):
    with pytest.raises(CheckpointError, match="cannot split into 3 model-parallel shards"):
        save_meta(make_model(), tmp_path / "m", num_shards=3)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- Hugging Face (parity: test_hf_parity.py)


def test_rotary_row_permutation():
    # One head of head_dim 4 (2 heads): Meta rows are pairs (0,1),(2,3); HF wants halves (0,2),(1,3).
    w = torch.arange(8.0)[:, None].expand(8, 3)
    assert meta_to_hf_rows(w, n_heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert hf_to_meta_rows(meta_to_hf_rows(w, 2), 2).equal(w)
    w6 = torch.arange(6.0)[:, None]  # head_dim 6: pairs (0,1),(2,3),(4,5) → (0,2,4),(1,3,5)
    assert meta_to_hf_rows(w6, 1)[:, 0].tolist() == [0, 2, 4, 1, 3, 5]


def test_hf_state_dict_names_and_inverse():
    model = make_model()
    hf = to_hf_state_dict(model.state_dict(), model.args)
    assert "model.layers.1.self_attn.k_proj.weight" in hf and "lm_head.weight" in hf
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], model.layers[0].feed_forward.w1.weight)
    assert torch.equal(hf["model.layers.1.mlp.down_proj.weight"], model.layers[1].feed_forward.w2.weight)
    assert torch.equal(hf["model.layers.0.post_attention_layernorm.weight"], model.layers[0].ffn_norm.weight)
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], model.layers[0].attention.wq.weight)
    back = from_hf_state_dict(hf, model.args)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    tied = make_model(tie_embeddings=True)
    assert "lm_head.weight" not in to_hf_state_dict(tied.state_dict(), tied.args)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['model.layers.0.self_attn.q_norm.weight'\]"):
        from_hf_state_dict({**hf, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, model.args)


@pytest.mark.parametrize(
    "dim,multiple_of,multiplier",
    [(64, 32, 1.3), (64, 256, None), (4096, 1024, 1.3), (8192, 4096, 1.3), (16384, 4096, 1.2), (2048, 256, 1.5),
     (3072, 256, 1.0), (96, 8, 0.5), (64, 1, 0.37)],
)
def test_intermediate_size_maps_back_exactly(dim, multiple_of, multiplier):
    args = LlamaArgs(dim=dim, n_layers=1, n_heads=4, vocab_size=8, multiple_of=multiple_of,
                     ffn_dim_multiplier=multiplier)
    back = args_from_hf_config(hf_config_from_args(args))
    assert back.hidden_dim == args.hidden_dim


def test_intermediate_size_recovers_metas_rule_for_released_shapes():
    assert ffn_rule(4096, 14336) == (1024, 1.3)  # Llama 3 / 3.1 8B
    assert ffn_rule(8192, 28672) == (4096, 1.3)  # Llama 3 / 3.1 70B
    assert ffn_rule(64, 100) == (100, 100 / 170)  # narrower than 8·dim/3: a multiplier shrinks it
    for size in range(1, 400):
        assert LlamaArgs(dim=64, n_layers=1, n_heads=4, vocab_size=8, multiple_of=ffn_rule(64, size)[0],
                         ffn_dim_multiplier=ffn_rule(64, size)[1]).hidden_dim == size


def test_hf_config_round_trip_and_fields():
    args = LlamaArgs(**TINY, tie_embeddings=True)
    config = hf_config_from_args(args)
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    assert (config["intermediate_size"], config["num_key_value_heads"], config["head_dim"]) == (224, 2, 16)
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 256
    back = args_from_hf_config(config)
    assert back.model_dump(exclude={"multiple_of", "ffn_dim_multiplier"}) == \
        args.model_dump(exclude={"multiple_of", "ffn_dim_multiplier"})
    unscaled = hf_config_from_args(args.model_copy(update={"use_scaled_rope": False}))
    assert unscaled["rope_scaling"] is None and not args_from_hf_config(unscaled).use_scaled_rope
    # Llama 3.2 1B/3B ship factor 32; transformers ≥ 5 writes `rope_parameters` holding rope_theta.
    v5 = {k: v for k, v in config.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 12345.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    args32 = args_from_hf_config(v5)
    assert (args32.rope_theta, args32.rope_scale_factor, args32.rope_original_context) == (12345.0, 32.0, 8192)
    default = args_from_hf_config({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}})
    assert not default.use_scaled_rope and default.rope_theta == 10000.0


def test_hf_config_bad_fields():
    config = hf_config_from_args(LlamaArgs(**TINY))
    cases = [
        ({k: v for k, v in config.items() if k != "num_hidden_layers"},
         r"missing required keys \['num_hidden_layers'\]"),
        ({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
        ({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"lacks \['low_freq_factor'"),
        ({**config, "hidden_act": "gelu"}, "'hidden_act' is 'gelu'"),
        ({**config, "attention_bias": True}, "'attention_bias' is True"),
        ({**config, "head_dim": 32}, "'head_dim' 32 must equal"),
        ({**config, "architectures": ["MllamaForConditionalGeneration"]}, "not a Llama language model"),
        ({**config, "num_key_value_heads": 3}, "invalid Llama config"),
    ]
    for bad, message in cases:
        with pytest.raises(CheckpointError, match=message):
            args_from_hf_config(bad, "config.json")


def test_hf_round_trip_is_exact_single_and_sharded(tmp_path):
    model = make_model(tie_embeddings=True)
    save_hf(model, tmp_path / "one")
    assert sorted(os.listdir(tmp_path / "one")) == ["config.json", "model.safetensors"]
    assert_same_weights(model, load_hf(tmp_path / "one"))
    save_hf(model, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    loaded = load_hf(tmp_path / "sharded")
    assert_same_weights(model, loaded)
    assert loaded.output.weight is loaded.tok_embeddings.weight


def test_hf_bad_inputs(tmp_path):
    model = make_model()
    folder = tmp_path / "hf"
    with pytest.raises(FileNotFoundError, match="hf"):
        load_hf(folder)
    save_hf(model, folder)
    (folder / "config.json").write_text('{"hidden_size": 64,,}')
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_hf(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_hf(folder)

    save_hf(model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_hf(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors"):
        load_hf(folder)
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_hf(folder)

    save_hf(model, folder, max_shard_bytes=100_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (folder / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"index.json: names shard '{victim}', which is missing"):
        load_hf(folder)

    save_hf(model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    message = r"'model.layers.0.mlp.gate_proj.weight' has shape \(224, 64\) but the config expects \(256, 64\)"
    with pytest.raises(CheckpointError, match=message):
        load_hf(folder)

    hf = to_hf_state_dict(model.state_dict(), model.args)
    del hf["model.norm.weight"]
    hf["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file({k: v.contiguous() for k, v in hf.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    message = r"missing keys \['model.norm.weight'\]; unexpected keys \['model.layers.0.self_attn.q_proj.bias'\]"
    with pytest.raises(CheckpointError, match=message):
        load_hf(folder)


# ---------------------------------------------------------------- detection and the convert command


def test_detect_layout(tmp_path):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "native")
    save_meta(model, tmp_path / "meta")
    save_hf(model, tmp_path / "hf")
    assert [detect_layout(tmp_path / n) for n in ("native", "meta", "hf")] == ["native", "meta", "hf"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="got a file"):
        from_pretrained(tmp_path / "hf" / "config.json")


def test_convert_cli_between_all_layouts(tmp_path, capsys):
    model = make_model(tie_embeddings=True)
    save_native(model, config_of(model), tmp_path / "native")
    reference = model(TOKENS)
    steps = [("native", "hf", ["--shards", "3"]), ("hf", "meta", ["--shards", "2"]), ("meta", "native2", []),
             ("native2", "meta1", []), ("meta1", "hf2", []), ("hf2", "native3", [])]
    for src, dst, extra in steps:
        layout = "native" if dst.startswith("native") else dst.rstrip("0123456789")
        assert cli(["convert", str(tmp_path / src), str(tmp_path / dst), "--to", layout, *extra]) == 0
        assert detect_layout(tmp_path / dst) == layout
        converted = from_pretrained(tmp_path / dst)
        assert converted.args.tie_embeddings
        assert torch.equal(converted(TOKENS), reference), f"{src} → {dst}"
    hf_files = os.listdir(tmp_path / "hf")
    assert sum(f.endswith(".safetensors") for f in hf_files) in (2, 3) and "model.safetensors.index.json" in hf_files
    assert sorted(f for f in os.listdir(tmp_path / "meta") if f.endswith(".pth")) == \
        ["consolidated.00.pth", "consolidated.01.pth"]
    assert "wrote" in capsys.readouterr().out


def test_convert_cli_dtype_and_errors(tmp_path, capsys):
    model = make_model()
    save_native(model, config_of(model), tmp_path / "src")
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "bf16"), "--to", "meta"]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "bf16"), "--to", "meta", "--force"]) == 0
    assert detect_layout(tmp_path / "bf16") == "meta"
    assert cli(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--to", "hf"]) == 1
    assert "nowhere: no such checkpoint folder" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "y"), "--to", "meta", "--shards", "3"]) == 1
    assert "cannot split into 3" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()

"""Released shapes count exactly as Meta's models; configs fail loudly; the CLI surface exists."""
import json

import pytest

from mm_llama.cli import COMMANDS, main
from mm_llama.config import ConfigError, ModelConfig, load_config

RELEASED = {  # SPEC §1.5, and the Llama 3.2 1B/3B model cards
    "llama3_8b": 8_030_261_248,
    "llama3_1_8b": 8_030_261_248,
    "llama3_70b": 70_553_706_496,
    "llama3_1_70b": 70_553_706_496,
    "llama3_1_405b": 405_853_388_800,
    "llama3_2_1b": 1_235_814_400,
    "llama3_2_3b": 3_212_749_824,
}


@pytest.mark.parametrize("name, total", RELEASED.items())
def test_released_parameter_counts(name, total, capsys):
    assert main(["params", f"configs/models/{name}.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == total


def test_405b_non_embedding_and_ffn_rule(capsys):
    main(["params", "configs/models/llama3_1_405b.yaml", "--json"])
    assert json.loads(capsys.readouterr().out)["non_embedding"] == 401_650_696_192
    cfg = load_config(ModelConfig, "configs/models/llama3_1_405b.yaml")
    assert cfg.lm.hidden_dim == 53_248
    assert load_config(ModelConfig, "configs/models/llama3_70b.yaml").lm.hidden_dim == 28_672
    assert load_config(ModelConfig, "configs/models/llama3_8b.yaml").lm.hidden_dim == 14_336


def test_params_table_is_readable(capsys):
    assert main(["params", "configs/models/llama3_8b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248" in out and "feed_forward" in out


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'lm.n_kv_head'; did you mean 'n_kv_heads'"):
        load_config(ModelConfig, "configs/models/tiny.yaml", ["lm.n_kv_head=2"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"tiny.yaml: 'lm.dim'"):
        load_config(ModelConfig, "configs/models/tiny.yaml", ["lm.dim=wide"])


def test_malformed_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlm: {dim: 4\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(ModelConfig, bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(ModelConfig, tmp_path / "missing.yaml")


def test_cli_error_exit_codes(capsys):
    assert main(["params", "configs/models/tiny.yaml", "lm.n_heads=3"]) == 1
    assert "n_heads (3) must divide dim (128)" in capsys.readouterr().err
    assert main(["validate", "configs/models/tiny.yaml"]) == 0
    assert "valid model config" in capsys.readouterr().out


def test_help_lists_the_design_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ["train", "pipeline", "validate", "params", "data", "tokenizer", "convert", "chat", "serve", "eval", "scaling"]:
        assert name in COMMANDS and name in out


def test_a_command_not_built_yet_says_so(capsys):
    from mm_llama.cli import _module

    missing = [name for name in COMMANDS if _module(name) is None]
    for name in missing:
        assert main([name]) == 2
        assert "not built yet" in capsys.readouterr().err


def test_speech_components_are_counted(capsys):
    assert main(["params", "configs/models/speech_1b_encoder.yaml", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["components"]["speech_encoder"] == 1_002_100_224  # the paper's "1B" Conformer
    assert out["total"] == 8_030_261_248 + 1_002_100_224 + out["components"]["speech_adapter"]


def test_data_pack_speech_command(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(3):
        t = np.arange(16000) / 16000
        sf.write(audio / f"utt{i}.wav", (0.1 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype("float32"), 16000)
    (audio / "broken.wav").write_bytes(b"RIFF0000WAVEnot audio")
    (tmp_path / "t.tsv").write_text("audio\ttranscript\nutt0.wav\tzero\nutt1.wav\tone\nutt2.wav\ttwo\nbroken.wav\tx\n")
    rc = main(["data", "pack", "speech", "--audio", str(audio), "--out", str(tmp_path / "out"),
               "--transcripts", str(tmp_path / "t.tsv"), "--language", "en", "--task", "asr"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "3 utterances" in captured.out and "bad_header 1" in captured.out
    assert list((tmp_path / "out").glob("*.tar"))

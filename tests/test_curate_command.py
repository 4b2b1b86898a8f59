"""`mm-llama data curate CONFIG [key=value ...]` through the command module."""
import argparse
import json

import webdataset as wds

from mm_llama.curate import command


def parse(argv):
    p = argparse.ArgumentParser()
    command.configure(p)
    return p.parse_args(argv)


def test_command_runs_config_with_overrides(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    with wds.TarWriter(str(raw / "a.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "txt": "the same words in every document of this shard", "json": {}})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inputs: [unused.tar]\noutput: unused\nlanguage: {enabled: false}\n")
    args = parse([str(cfg), f"inputs=[{raw}/a.tar]", f"output={tmp_path}/out", "workers=1", "--json"])
    assert command.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["removed"] == {"minhash_duplicate": 2} and report["documents_out"] == 1
    args = parse([str(cfg), f"inputs=[{raw}/a.tar]", f"output={tmp_path}/out2", "workers=1"])
    assert command.run(args) == 0
    out = capsys.readouterr().out
    assert "3 in, 1 out" in out and "minhash_duplicate" in out


def test_data_value_anneal_config_is_a_30_70_linear_anneal():
    from mm_llama.config import CONFIG_ROOT, load_config
    from mm_llama.config.stage import StageConfig

    c = load_config(StageConfig, CONFIG_ROOT / "curate" / "data_value_anneal.yaml")
    weights = {s.name: s.weight for s in c.data.sources}
    assert weights.pop("candidate") == 0.3 and abs(sum(weights.values()) - 0.7) < 1e-9
    assert c.optim.schedule == "linear" and c.optim.warmup_steps == 0
    tokens = c.train.steps * c.train.seq_len * c.train.micro_batch * c.train.grad_accum * 8
    assert abs(tokens - 40e9) / 40e9 < 0.001  # 40B tokens on 8 data-parallel ranks

"""Pipeline graphs: order, selection, inputs, and the bad graphs rejected before anything runs."""
import json
from pathlib import Path

import pytest

from mm_llama.config import ConfigError
from mm_llama.pipeline import PipelineConfig, select, stage_order, stage_overrides


def graph(**stages):
    return PipelineConfig(name="g", stages={k: {"config": "x.yaml", **v} for k, v in stages.items()})


def test_order_respects_weights_and_inputs():
    g = graph(adapter={"init_from": "text", "inputs": {"train.options.encoder_from": "clip"}}, text={}, clip={})
    order = stage_order(g, "g.yaml")
    assert order.index("adapter") > order.index("text") and order.index("adapter") > order.index("clip")
    words = stage_overrides(g, "adapter", Path("out"))
    assert "init.from=out/text" in words and "train.options.encoder_from=out/clip" in words
    assert "run.out_dir=out/adapter" in words


def test_missing_input_and_cycle_are_rejected():
    with pytest.raises(ConfigError, match="stage 'b' needs \\['nope'\\]"):
        stage_order(graph(a={}, b={"inputs": {"k": "nope"}}), "g.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        stage_order(graph(a={"init_from": "b"}, b={"after": ["a"]}), "g.yaml")


def test_only_and_from_select_stages():
    g = graph(a={}, b={"init_from": "a"}, c={"init_from": "b"}, d={})
    order = stage_order(g, "g.yaml")
    assert select(order, g, ["c"], None) == ["c"]
    assert set(select(order, g, None, "b")) == {"b", "c"}
    with pytest.raises(ConfigError, match="no stage named 'z'"):
        select(order, g, ["z"], None)


def test_stage_metrics_are_flat_with_baselines():
    from mm_llama.pipeline.report import stage_metrics

    got = stage_metrics("vision_adapter", {"stage": "vision_adapter", "steps": 3, "val_loss": 1.5, "val_acc_colour": 0.9,
                                           "val_majority_colour": 0.3, "val_chance_colour": 0.25})
    assert got == {"vision_adapter.val_loss": 1.5, "vision_adapter.image_qa_accuracy_colour": 0.9,
                   "vision_adapter.image_qa_accuracy_colour_baseline": 0.3}
    got = stage_metrics("speech_adapter", {"asr_wer": 0.2, "asr_wer_baseline": 0.65})
    assert got == {"speech_adapter.asr_wer": 0.2, "speech_adapter.asr_wer_baseline": 0.65}
    # the starting weights' values (train.eval_untrained) under the same flat names
    got = stage_metrics("vision_adapter", {"val_acc_colour": 0.9, "val_majority_colour": 0.3, "untrained_val_acc_colour": 0.0,
                                           "untrained_val_majority_colour": 0.3, "untrained_val_loss": 3.0,
                                           "val_loss": 1.5})
    assert got == {"vision_adapter.image_qa_accuracy_colour": 0.9, "vision_adapter.image_qa_accuracy_colour_baseline": 0.3,
                   "vision_adapter.image_qa_accuracy_colour_untrained": 0.0, "vision_adapter.val_loss": 1.5,
                   "vision_adapter.val_loss_untrained": 3.0}
    # preference accuracies: a coin is right half the time; BEST-RQ's val_accuracy is not a preference
    got = stage_metrics("reward_model", {"val_accuracy": 0.8, "val_loss": 0.4}, objective="reward_model")
    assert got["reward_model.val_accuracy_baseline"] == 0.5 and "reward_model.val_loss_baseline" not in got
    assert stage_metrics("dpo", {"val_reward_accuracy": 0.7}, objective="dpo")["dpo.val_reward_accuracy_baseline"] == 0.5
    assert "x.val_accuracy_baseline" not in stage_metrics("x", {"val_accuracy": 0.2}, objective="bestrq")


def test_stage_times_add_up_and_reach_the_summary(tmp_path):
    from mm_llama.commands.pipeline import _clock, _record_time
    from mm_llama.pipeline.report import write_report

    start = _clock()
    sum(i * i for i in range(200_000))  # some CPU time to record
    _record_time(tmp_path, "text", start)
    first = json.loads((tmp_path / "timings.json").read_text())["text"]
    assert first["cpu_s"] >= 0 and first["wall_s"] >= 0
    _record_time(tmp_path, "text", (start[0] - 10.0, start[1] - 4.0))  # a resumed run adds its own time
    again = json.loads((tmp_path / "timings.json").read_text())["text"]
    assert again["wall_s"] >= first["wall_s"] + 10.0 and again["cpu_s"] >= first["cpu_s"] + 4.0
    write_report(tmp_path, "g", ["text"], {"heldout_loss": 3.0, "heldout_loss_baseline": 6.0})
    summary = (tmp_path / "summary.md").read_text()
    assert "## Time per stage" in summary and f"| text | {again['wall_s']:.0f} | {again['cpu_s']:.0f} |" in summary

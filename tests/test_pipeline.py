"""Pipeline graphs: order, selection, inputs, and the bad graphs rejected before anything runs."""
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

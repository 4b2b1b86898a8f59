"""The whole demo recipe at CI size (`configs/pipelines/ci.yaml`) in the default test run: the demo data is
written, every stage of the graph trains, and each evaluation of the final models beats the model before
its training (the "untrained" value every stage records with `train.eval_untrained`)."""
from __future__ import annotations

import json
import re

import pytest

from mm_llama.cli import main
from mm_llama.data.demo import write_demo
from mm_llama.pipeline import load_pipeline

PIPELINE = "configs/pipelines/ci.yaml"
LOWER_IS_BETTER = re.compile(r"loss|wer")

# eval of the final models -> the same eval of the model its chain started from, before any training of that
# kind (the image questions of the annealed vision model against the text LM with closed gates)
AGAINST_UNTRAINED = {
    "heldout_loss": "text_pretrain.val_loss_untrained",
    "image_encoder_pretrain.retrieval_i2t": "image_encoder_pretrain.retrieval_i2t_untrained",
    "image_encoder_pretrain.retrieval_t2i": "image_encoder_pretrain.retrieval_t2i_untrained",
    "speech_encoder_pretrain.val_accuracy": "speech_encoder_pretrain.val_accuracy_untrained",
    "vision_anneal.image_qa_accuracy_colour": "vision_adapter.image_qa_accuracy_colour_untrained",
    "vision_anneal.image_qa_accuracy_shape": "vision_adapter.image_qa_accuracy_shape_untrained",
    "vision_anneal.image_qa_accuracy_count": "vision_adapter.image_qa_accuracy_count_untrained",
    "vision_anneal.image_qa_accuracy_position": "vision_adapter.image_qa_accuracy_position_untrained",
    "vision_adapter.image_qa_accuracy_caption": "vision_adapter.image_qa_accuracy_caption_untrained",
    "video_adapter.video_qa_accuracy_colour": "video_adapter.video_qa_accuracy_colour_untrained",
    "video_adapter.video_qa_accuracy_shape": "video_adapter.video_qa_accuracy_shape_untrained",
    "video_adapter.video_qa_accuracy_motion": "video_adapter.video_qa_accuracy_motion_untrained",
    "speech_adapter.asr_wer": "speech_adapter.asr_wer_untrained",
    "reward_model.val_accuracy": "reward_model.val_accuracy_untrained",
    "vision_reward_model.val_accuracy": "vision_reward_model.val_accuracy_untrained",
    **{f"{stage}.val_loss": f"{stage}.val_loss_untrained" for stage in (
        "image_encoder_pretrain", "speech_encoder_pretrain", "vision_adapter", "video_adapter", "speech_adapter",
        "sft", "reward_model", "vision_reward_model", "dpo")},
}
# ... and, where this size clears it by a wide margin, against the blind baseline (unigram text model, chance,
# majority answer, a coin for preferences; DPO only here: its policy equals the reference before training, so
# every margin is 0 and its untrained accuracy 0 says nothing)
AGAINST_BLIND = ["heldout_loss", "image_encoder_pretrain.retrieval_i2t", "image_encoder_pretrain.retrieval_t2i",
                 "vision_anneal.image_qa_accuracy_colour", "vision_anneal.image_qa_accuracy_shape",
                 "video_adapter.video_qa_accuracy_colour", "reward_model.val_accuracy", "dpo.val_reward_accuracy"]
# Image count and position, video shape and motion beat the untrained model at this size, not yet the majority
# answer.


def better(key: str, value: float, reference: float) -> bool:
    return value < reference if LOWER_IS_BETTER.search(key) else value > reference


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ci")
    data, out = root / "data", root / "runs"
    write_demo(data)
    assert main(["pipeline", PIPELINE, "--out", str(out), f"data.root={data}"]) == 0
    return out


def test_every_stage_of_the_graph_finishes(ci_run):
    for name, stage in load_pipeline(PIPELINE).stages.items():
        assert (ci_run / name / ("final/model.safetensors" if stage.kind == "train" else "")).exists(), name
    assert (ci_run / "summary.md").read_text().startswith("# Pipeline `ci`")


def test_the_final_models_beat_the_untrained_and_blind_baselines(ci_run):
    metrics = json.loads((ci_run / "eval.json").read_text())
    needed = [*AGAINST_UNTRAINED, *AGAINST_UNTRAINED.values(), *(f"{k}_baseline" for k in AGAINST_BLIND)]
    assert not [k for k in needed if k not in metrics], "eval.json lacks some evals"
    worse = {k: (metrics[k], metrics[u]) for k, u in AGAINST_UNTRAINED.items() if not better(k, metrics[k], metrics[u])}
    assert not worse, f"final model vs untrained: {worse}"
    worse = {k: (metrics[k], metrics[f"{k}_baseline"]) for k in AGAINST_BLIND
             if not better(k, metrics[k], metrics[f"{k}_baseline"])}
    assert not worse, f"final model vs blind baseline: {worse}"

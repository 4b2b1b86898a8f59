"""The whole demo recipe end to end at a smaller size: every stage runs, the report is written."""
import json

import pytest

from mm_llama.cli import main
from mm_llama.pipeline import load_pipeline


@pytest.mark.slow
def test_demo_pipeline_runs_every_stage(tmp_path):
    data, out = tmp_path / "data", tmp_path / "runs"
    assert main(["data", "demo", str(data)]) == 0
    assert main(["pipeline", "configs/pipelines/demo.yaml", "--out", str(out), f"data.root={data}",
                 "train.steps=4", "run.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1"]) == 0
    stages = load_pipeline("configs/pipelines/demo.yaml").stages
    for name, stage in stages.items():
        if stage.kind == "train":
            assert (out / name / "final" / "model.safetensors").exists(), name
    metrics = json.loads((out / "eval.json").read_text())
    assert {"heldout_loss", "heldout_loss_baseline", "speech_adapter.asr_wer", "speech_adapter.asr_wer_baseline",
            "vision_anneal.image_qa_accuracy_colour", "image_encoder_pretrain.retrieval_i2t",
            "video_adapter.video_qa_accuracy_motion", "video_adapter.video_qa_accuracy_motion_baseline",
            "reward_model.val_accuracy", "dpo.val_reward_accuracy", "vision_reward_model.val_accuracy"} <= set(metrics)
    assert (out / "summary.md").read_text().startswith("# Pipeline `demo`")
    # running again skips every finished stage
    assert main(["pipeline", "configs/pipelines/demo.yaml", "--out", str(out), f"data.root={data}",
                 "train.steps=4", "run.checkpoint_every=2", "train.eval_every=0", "train.eval_batches=1"]) == 0

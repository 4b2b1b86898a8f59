"""Pipeline × tensor parallelism of the objectives besides 'lm' (parallel.pp=2 × parallel.tp=2, CPU, gloo, 4
processes): each pipeline stage is split by the composed TP plan (`apply_tp_composed`: its LM blocks, its embedding
or output, the cross-attention blocks and encoders it holds), and the runs reproduce the single-process losses,
gradient norms, held-out metrics and weights after two steps (to 1e-4: see `test_parallel_pp_preference.COMMON_PP`).
Without a process group: the plan finds the embedding and output a stage holds."""
import pytest
import torch
from safetensors.torch import load_file

import test_parallel_multimodal as multimodal
import test_parallel_pp_objectives as objectives
import test_parallel_pp_preference as preference
from mm_llama.config import load_config
from mm_llama.config.stage import StageConfig
from mm_llama.train.engine import train_stage
from test_parallel_multimodal import rows

root, lm_dir = multimodal.root, multimodal.lm_dir

LAYOUT = ["parallel.pp=2", "parallel.tp=2"]
# name -> the module whose `stage` builds its config
CASES = {"sft": objectives, "video_lm": objectives, "reward_model": preference, "dpo": preference}
TOL = preference.TOL


@pytest.fixture(scope="module")
def pp_tp_runs(root, lm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp_tp")
    mp = pytest.MonkeyPatch()
    mp.setattr(multimodal, "DP", 4)  # the launch's process count
    try:
        multimodal.torchrun([m.stage(name, root, lm_dir, tmp / name, *LAYOUT) for name, m in CASES.items()], tmp)
    finally:
        mp.undo()
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_and_tensor_parallel_reproduce_the_single_process_run(name, pp_tp_runs, root, lm_dir, tmp_path):
    ref = train_stage(CASES[name].stage(name, root, lm_dir, tmp_path / "single"))
    got, want = rows(pp_tp_runs / name), rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-4)
    held_out = [k for k in got[0] if k.startswith("val_")]  # a pipelined LM task reports val_loss only
    assert "val_loss" in held_out
    for k in held_out:
        assert [r[k] for r in got] == pytest.approx([r[k] for r in want], rel=TOL, abs=TOL), k
    final = load_file(str(pp_tp_runs / name / "final" / "model.safetensors"))
    expected = load_file(str(ref / "final" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], atol=TOL, rtol=TOL, msg=k)


def test_the_composed_plan_splits_the_embedding_and_output_a_stage_holds(tmp_path):
    """On a one-rank mesh (one process): a first stage's embedding and a last stage's output, and every LM block
    of both, become DTensors; a middle stage holds neither."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mm_llama.model import Transformer
    from mm_llama.parallel.pipeline import StageModule
    from mm_llama.parallel.tensor_parallel import apply_tp_composed

    cfg = load_config(StageConfig, "configs/stages/tiny/sft.yaml", [*multimodal.LM, "model.lm.n_layers=3"])
    model = Transformer(cfg.model.lm)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        first, middle, last = (StageModule(model, [i], i == 0, i == 2) for i in range(3))
        for stage in (first, middle, last):
            apply_tp_composed(stage, mesh)
        assert isinstance(first.tok_embeddings.weight, DTensor) and isinstance(last.output.weight, DTensor)
        assert middle.tok_embeddings is None and middle.output is None
        for stage in (first, middle, last):
            assert all(isinstance(p, DTensor) for p in stage.layers.parameters() if p.ndim == 2)
    finally:
        dist.destroy_process_group()

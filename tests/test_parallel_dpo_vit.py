"""Under torchrun (CPU, gloo, 2 processes): DPO's reference model is laid out like the policy (FSDP over the
data-parallel ranks, the policy's TP plan) and gives the single-process log-probs; open_clip's fused-q,k,v
attention (ViT, global gated layers, CLIP text tower) is split by heads under TP and reproduces the
single-process outputs and gradients while its checkpoint tensors stay the single-process ones.

One launch runs every check (the driver below); pytest compares what rank 0 saved with a single process."""
import os
import subprocess
import sys

import pytest
import torch

from mm_llama.config import ModelConfig, dump_config, load_config
from mm_llama.config.stage import StageConfig
from mm_llama.config.vision import VisionConfig
from mm_llama.data.demo_dialog import write_dialog
from mm_llama.infer.loading import save_multimodal
from mm_llama.model import LlamaArgs
from mm_llama.model.multimodal import MultimodalModel
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.dpo import sequence_logps
from test_parallel_engine import _port

LM = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 4352, "multiple_of": 16,
      "max_seq_len": 256}
VISION = {"encoder": {"tile_size": 28, "patch_size": 14, "width": 32, "layers": 2, "heads": 4, "max_num_tiles": 2,
                      "intermediate_layers": [1, 2], "n_global_layers": 1, "attention_bias": True},
          "n_cross_attention_layers": 1}
LAYOUTS = {"dp": "parallel.dp_shard=2", "tp": "parallel.tp=2"}

DRIVER = '''
import sys, torch; torch.set_num_threads(1)
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from mm_llama.config import load_config
from mm_llama.config.stage import StageConfig
from mm_llama.parallel import ParallelDims, ParallelRun
from mm_llama.train.tasks import task_for
from mm_llama.train.tasks.dpo import sequence_logps
from mm_llama.train.trainable import select_trainable

dist.init_process_group("gloo")
rank, world, out = dist.get_rank(), dist.get_world_size(), sys.argv[1]


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


for layout, path in zip(sys.argv[2::2], sys.argv[3::2]):  # DPO: the reference laid out like the policy
    cfg = load_config(StageConfig, path)
    task = task_for(cfg)
    policy = task.build_model()
    select_trainable(policy, cfg.train.trainable, cfg.train.frozen)
    ParallelRun.setup_task(policy, task, cfg, ParallelDims.resolve(cfg.parallel, world), torch.device("cpu"),
                           torch.float32, lambda block: None)
    batch = next(iter(task.loader(cfg.train.seq_len, 2, 0, 1)))  # the same batch on every rank
    loss = task.loss(policy, batch, "cpu")  # builds the reference on first use
    loss.backward()
    reference = task.reference_model("cpu")
    with torch.no_grad():
        logps = sequence_logps(reference(batch.tokens, **batch.media_inputs("cpu")), batch.labels)[0]
        again = sequence_logps(reference(batch.tokens, **batch.media_inputs("cpu")), batch.labels)[0]
    params = dict(reference.named_parameters())
    facts = {"grads": sum(p.grad is not None for p in params.values()),
             "requires_grad": sum(p.requires_grad for p in params.values()),
             "local": sum(local(p).numel() for p in params.values()), "numel": sum(p.numel() for p in params.values()),
             "fused": {k: (type(p).__name__, str(getattr(p, "placements", None)), tuple(local(p).shape))
                       for k, p in params.items() if k.endswith("in_proj_weight")},
             # after a forward, FSDP's parameters are its shards again (a 1-row tensor: rank 0 holds it whole)
             "whole_after_forward": [k for k, p in params.items() if not isinstance(p, DTensor)
                                     or (p.shape[0] > 1 and local(p).numel() == p.numel())]}
    state = get_model_state_dict(reference, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"loss": loss.detach(), "logps": logps, "again": again, "facts": facts, "state": state},
                   f"{out}/{layout}.pt")

# a model with no registered method called inside its forward (a text LM): its root too is resharded after it
from mm_llama.model import LlamaArgs, Transformer
from mm_llama.parallel.fsdp import shard_frozen

mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
args = LlamaArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=64)
lm = shard_frozen(Transformer(args), mesh["tp"], mesh["dp"], torch.float32)
with torch.no_grad():
    lm(torch.randint(0, 64, (2, 8)))
if rank == 0:
    torch.save([k for k, p in lm.named_parameters() if not isinstance(p, DTensor)], f"{out}/frozen_lm.pt")

# open_clip attention split by heads: a ViT block (open_clip Attention) and a CLIP text tower (MultiheadAttention)
from open_clip.transformer import CustomResidualAttentionBlock, TextTransformer
from mm_llama.parallel.tensor_parallel import apply_tp_composed

mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
blocks = torch.load(f"{out}/attention_in.pt", weights_only=False)
torch.manual_seed(0)
models = {"vit": CustomResidualAttentionBlock(32, 4, 2.0),
          "text": TextTransformer(context_length=8, vocab_size=50, width=32, heads=4, layers=1, output_dim=16)}
result = {}
for name, model in models.items():
    model.load_state_dict(blocks[name]["state"])
    apply_tp_composed(torch.nn.ModuleList([model]), mesh)
    inputs = blocks[name]["inputs"]
    if name == "vit":
        inputs["x"].requires_grad_(True)
        y = model(inputs["x"], attn_mask=inputs["mask"])
    else:
        y = model(inputs["text"])
    (y ** 2).sum().backward()
    result[name] = {"out": y.detach(), "x_grad": inputs["x"].grad if name == "vit" else None,
                    "grads": {k: full(p.grad) for k, p in model.named_parameters()},
                    "state": {k: full(v) for k, v in model.state_dict().items()},
                    "fused": {k: (str(p.placements), tuple(local(p).shape))
                              for k, p in model.named_parameters() if "in_proj" in k}}
if rank == 0:
    torch.save(result, f"{out}/attention_out.pt")
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def root(demo_data):
    write_dialog(demo_data)
    return demo_data


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """A composed image–text model with open gates (so images matter), saved."""
    folder = tmp_path_factory.mktemp("models") / "vlm"
    torch.manual_seed(3)
    model = MultimodalModel(LlamaArgs(**LM), VisionConfig(**VISION))
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.gate_attn.fill_(1.0)
            block.gate_ffwd.fill_(1.0)
    save_multimodal(model, ModelConfig(name="v", lm=LlamaArgs(**LM), vision=VisionConfig(**VISION)), folder)
    return folder


def vision_dpo(root, vlm, out, *extra) -> StageConfig:
    overrides = [f"model.lm.{k}={v}" for k, v in LM.items()] + [
        *(f"model.vision.encoder.{k}={str(v).replace(' ', '')}" for k, v in VISION["encoder"].items()),
        "model.vision.n_cross_attention_layers=1", "train.options.reference_ema=null", "train.seq_len=48",
        "data.num_workers=0", f"data.root={root}", f"run.out_dir={out}", f"init.from={vlm}"]
    return load_config(StageConfig, "configs/stages/tiny/vision_dpo.yaml", [*overrides, *extra])


def attention_inputs() -> dict:
    """Random weights (biases non-zero) and inputs for a ViT block and a CLIP text tower of width 32, 4 heads."""
    from open_clip.transformer import CustomResidualAttentionBlock, TextTransformer

    g = torch.Generator().manual_seed(1)
    out = {}
    for name, model in (("vit", CustomResidualAttentionBlock(32, 4, 2.0)),
                        ("text", TextTransformer(context_length=8, vocab_size=50, width=32, heads=4, layers=1,
                                                 output_dim=16))):
        state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in model.state_dict().items()
                 if v.is_floating_point()}
        model.load_state_dict(state, strict=False)
        if name == "vit":
            mask = torch.zeros(2, 1, 6, 6)
            mask[:, :, 4:, 4:] = float("-inf")  # pad -> pad blocked, as the tiled encoder's mask
            inputs = {"x": torch.randn(2, 6, 32, generator=g), "mask": mask}
        else:
            inputs = {"text": torch.randint(1, 50, (3, 8), generator=g)}
        out[name] = {"state": model.state_dict(), "inputs": inputs, "model": model}
    return out


@pytest.fixture(scope="module")
def launch(root, vlm, tmp_path_factory):
    """One 2-process launch: the DPO reference at dp=2 and at tp=2, then the attention split at tp=2."""
    tmp = tmp_path_factory.mktemp("dpo_vit")
    args = []
    for layout, override in LAYOUTS.items():
        path = tmp / f"{layout}.yaml"
        path.write_text(dump_config(vision_dpo(root, vlm, tmp / layout, override)))
        args += [layout, str(path)]
    blocks = attention_inputs()
    torch.save({k: {"state": v["state"], "inputs": v["inputs"]} for k, v in blocks.items()}, tmp / "attention_in.pt")
    (tmp / "driver.py").write_text(DRIVER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(tmp / "driver.py"), str(tmp), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp, blocks


@pytest.fixture(scope="module")
def single(root, vlm, tmp_path_factory):
    """The single process: the reference's log-probs on the driver's batch, its state dict, the DPO loss."""
    task = task_for(vision_dpo(root, vlm, tmp_path_factory.mktemp("single")))
    batch = next(iter(task.loader(48, 2, 0, 1)))
    reference = task.reference_model("cpu")
    with torch.no_grad():
        logps = sequence_logps(reference(batch.tokens, **batch.media_inputs("cpu")), batch.labels)[0]
        loss = task.loss(task.build_model(), batch, "cpu")
    return logps, reference.state_dict(), loss


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_reference_gives_the_single_process_logprobs(layout, launch, single):
    got = torch.load(launch[0] / f"{layout}.pt", weights_only=False)
    want, _, loss = single
    assert got["logps"].shape == want.shape and want.abs().min() > 1  # summed over responses: far from 0
    torch.testing.assert_close(got["logps"], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["again"], got["logps"], atol=0, rtol=0)  # a second forward: same weights
    torch.testing.assert_close(got["loss"], loss, atol=1e-5, rtol=0)  # the policy (ViT heads split under TP) too


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_dpo_reference_is_frozen_and_saves_the_single_process_tensors(layout, launch, single):
    facts = torch.load(launch[0] / f"{layout}.pt", weights_only=False)["facts"]
    assert facts["grads"] == 0 and facts["requires_grad"] == 0
    state = torch.load(launch[0] / f"{layout}.pt", weights_only=False)["state"]
    _, want, _ = single
    assert state.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(state[k], v, atol=0, rtol=0, msg=k)


def test_dpo_reference_is_sharded_over_the_data_parallel_ranks(launch):
    """FSDP: each rank holds half of the reference (up to padding), gathered only during its forward."""
    facts = torch.load(launch[0] / "dp.pt", weights_only=False)["facts"]
    assert facts["local"] <= 0.52 * facts["numel"]
    assert facts["whole_after_forward"] == []


def test_a_frozen_text_lm_is_resharded_after_its_forward(launch):
    """Its root has no nested registered method (`encode_images`) that would reshard it on FSDP's own."""
    assert torch.load(launch[0] / "frozen_lm.pt", weights_only=False) == []


def test_dpo_reference_follows_the_policy_tensor_parallel_plan(launch):
    """TP=2: the ViT's and global layers' fused attention projections are split like the policy's (by heads)."""
    fused = torch.load(launch[0] / "tp.pt", weights_only=False)["facts"]["fused"]
    width = VISION["encoder"]["width"]
    n_blocks = VISION["encoder"]["layers"] + VISION["encoder"]["n_global_layers"]
    assert len(fused) == n_blocks
    assert set(fused.values()) == {("DTensor", "(Shard(dim=0),)", (3 * width // 2, width))}


@pytest.mark.parametrize("name", ["vit", "text"])
def test_open_clip_attention_split_by_heads_reproduces_one_process(name, launch):
    """Outputs and every gradient (full tensors) within 1e-5 of one process; checkpoint tensors unchanged."""
    got = torch.load(launch[0] / "attention_out.pt", weights_only=False)[name]
    block = launch[1][name]
    model, inputs = block["model"], block["inputs"]
    if name == "vit":
        x = inputs["x"].clone().requires_grad_(True)
        y = model(x, attn_mask=inputs["mask"])
    else:
        y = model(inputs["text"])
    (y ** 2).sum().backward()
    scale = float(y.detach().abs().max())
    torch.testing.assert_close(got["out"], y.detach(), atol=1e-5 * scale, rtol=0)
    if name == "vit":
        torch.testing.assert_close(got["x_grad"], x.grad, atol=1e-5 * float(x.grad.abs().max()), rtol=0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][k], p.grad, atol=1e-5 * float(p.grad.abs().max()), rtol=0, msg=k)
    assert got["state"].keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, atol=0, rtol=0, msg=k)
    # the fused q,k,v projection is what is split: half of its rows on each rank, under its own name
    assert got["fused"] and all(placement == "(Shard(dim=0),)" and shape[0] == 3 * 32 // 2
                                for placement, shape in got["fused"].values())


@pytest.mark.parametrize("option", ["qk_norm", "scaled_cosine", "scale_heads", "inner_norm"])
def test_attention_variants_that_cannot_be_split_by_heads_are_refused(option):
    from open_clip.transformer import Attention

    from mm_llama.config import ConfigError
    from mm_llama.parallel.tensor_parallel import _refuse_variants

    _refuse_variants(Attention(16, 2))  # the plain form splits
    _refuse_variants(torch.nn.MultiheadAttention(16, 2))
    with pytest.raises(ConfigError, match="parallel.tp > 1 splits open_clip attention by heads"):
        _refuse_variants(Attention(16, 2, **{option: True}))
    with pytest.raises(ConfigError, match="bias_k/bias_v"):
        _refuse_variants(torch.nn.MultiheadAttention(16, 2, add_bias_kv=True))

"""CUDA checks, skipped where no GPU is present (CI has none; run them on a lent GPU with `bench/gpu_check.sh`).

The CPU suite proves the numerics; these prove the same code runs on a GPU and agrees with the CPU:
bf16 autocast within bf16 tolerance, fp32 within float tolerance, the compiled blocks equal to eager.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine_helpers import stage
from mm_llama.config.vision import VisionConfig
from mm_llama.infer import Generator, Prompt, SamplingConfig
from mm_llama.model import LlamaArgs, Transformer, init_weights
from mm_llama.model.multimodal import MultimodalModel
from mm_llama.train.engine import train_stage
from mm_llama.train.losses import IGNORE, compiled_lm_loss_sum, lm_loss_sum

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ARGS = LlamaArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, multiple_of=32,
                 use_scaled_rope=True, rope_original_context=64, max_seq_len=512)


def lm(seed=0) -> Transformer:
    return init_weights(Transformer(ARGS), torch.Generator().manual_seed(seed)).eval()


def tokens(b=2, t=96, seed=1) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double().cpu() - want.double().cpu()).norm() / want.double().cpu().norm())


def test_lm_fp32_on_gpu_equals_cpu_and_bf16_autocast_is_within_bf16_error():
    model, x = lm(), tokens()
    with torch.no_grad():
        want = model(x)
        gpu = model.cuda()
        assert rel_err(gpu(x.cuda()), want) < 1e-5
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert rel_err(gpu(x.cuda()), want) < 2e-2


def test_document_mask_on_gpu_equals_separate_documents():
    model, x = lm().cuda(), tokens(1, 64).cuda()
    doc_ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14], device="cuda")
    with torch.no_grad():
        packed = model(x, doc_ids=doc_ids)
        parts = [model(x[:, a:b]) for a, b in [(0, 20), (20, 50), (50, 64)]]
    assert (packed - torch.cat(parts, dim=1)).abs().max() < 1e-4


def test_compiled_blocks_equal_eager_forward_and_backward_on_gpu():
    eager, x = lm().cuda().train(), tokens().cuda()
    compiled = lm().cuda().train()
    for block in compiled.layers:
        block.compile()
    losses, grads = [], []
    for model in (eager, compiled):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        losses.append(loss.item())
        grads.append(model.layers[0].attention.wq.weight.grad)
    assert losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert rel_err(grads[1], grads[0]) < 1e-4


def test_compiled_loss_equals_eager_on_bf16_logits_on_gpu():
    logits = torch.randn(2, 96, ARGS.vocab_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = tokens().cuda()
    labels[:, -1] = IGNORE
    got, want = compiled_lm_loss_sum()(logits, labels), lm_loss_sum(logits, labels)
    assert got.dtype == want.dtype == torch.float32
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    got_grad, = torch.autograd.grad(got, logits)
    want_grad, = torch.autograd.grad(want, logits)
    assert got_grad.dtype == torch.bfloat16 and rel_err(got_grad, want_grad) < 1e-2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_engine_trains_a_tiny_stage_on_gpu_in_bf16_autocast(demo_data, tmp_path, compiled):
    run_dir = train_stage(stage(demo_data, tmp_path / "run", "train.steps=8", "run.device=cuda",
                                "optim.lr=3e-3", "optim.warmup_steps=1", f"train.compile={str(compiled).lower()}"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run_dir / "final").is_dir()


def test_greedy_generation_on_gpu_equals_cpu():
    model = lm()
    prompts = [Prompt([1, 2, 3, 4, 5]), Prompt([9, 8])]
    cfg = SamplingConfig(max_new_tokens=10)
    want = [c.tokens for c in Generator(model).generate(prompts, cfg)]
    got = [c.tokens for c in Generator(model.cuda()).generate(prompts, cfg)]
    assert got == want


def test_composed_vision_model_on_gpu_equals_cpu():
    vision = VisionConfig(encoder=dict(tile_size=28, patch_size=14, width=32, layers=3, heads=4, max_num_tiles=2,
                                       intermediate_layers=[1, 3], n_global_layers=1),
                          n_cross_attention_layers=1, image_token_id=290)
    torch.manual_seed(0)
    model = MultimodalModel(ARGS, vision).eval()
    with torch.no_grad():
        for block in model.cross_attention.values():
            block.gate_attn.fill_(0.5)
            block.gate_ffwd.fill_(0.5)
    x = tokens(2, 16)
    x[:, 3] = 290
    images = torch.randn(2, 1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    ratios = torch.tensor([[[1, 2]], [[2, 1]]])
    with torch.no_grad():
        want = model(x, images=images, aspect_ratios=ratios)
        got = model.cuda()(x.cuda(), images=images.cuda(), aspect_ratios=ratios.cuda())
    assert rel_err(got, want) < 1e-4

"""Hand-written backward passes in the model give autograd's gradients (fp32 rounding only)."""
import pytest
import torch
import torch.nn.functional as F

from mm_llama.model import LlamaArgs, RMSNorm, Transformer, init_weights
from mm_llama.model import llama as llama_module


def reference_rotary(x, cos, sin):
    """The real-valued pairwise rotation, differentiated by autograd."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


@pytest.mark.parametrize("shape", [(7, 16), (2, 3, 16), (2, 3, 4, 16)])
def test_rmsnorm_matches_autograd_through_f_rms_norm(shape):
    torch.manual_seed(0)
    norm = RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, g = torch.randn(*shape, requires_grad=True), torch.randn(*shape)
    y = norm(x)
    ref = F.rms_norm(x, (16,), norm.weight, 1e-5)
    assert torch.equal(y, ref)
    got, want = torch.autograd.grad(y, (x, norm.weight), g), torch.autograd.grad(ref, (x, norm.weight), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rmsnorm_frozen_weight_gets_no_gradient():
    norm = RMSNorm(8, 1e-5).requires_grad_(False)
    x = torch.randn(3, 8, requires_grad=True)
    norm(x).sum().backward()
    assert norm.weight.grad is None and x.grad is not None


def test_model_gradients_match_reference_formulation(monkeypatch):
    args = LlamaArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=64)
    model = init_weights(Transformer(args), torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ours = grads()
    monkeypatch.setattr(llama_module, "apply_rotary", reference_rotary)
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: F.rms_norm(x, self.weight.shape, self.weight, self.eps))
    reference = grads()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)

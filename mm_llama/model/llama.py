"""The Llama 3 decoder (SPEC §1.3), parameter names identical to Meta's checkpoints."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import LlamaArgs
from .kv_cache import KVCache
from .masks import AttentionMask, document_mask, document_positions, offset_causal_mask
from .rope import apply_rotary, inv_frequencies, rotary_tables


class _RMSNormFp32(torch.autograd.Function):
    """fp32 RMSNorm, forward bit for bit `F.rms_norm`'s; hand-written backward because autograd
    through `F.rms_norm` runs about twice as many passes over the activations on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        x_hat = x * rstd
        ctx.save_for_backward(x_hat, weight, rstd)
        return x_hat * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x_hat, weight, rstd = ctx.saved_tensors
        grad_x = grad_weight = None
        grad_x_hat_w = grad * x_hat  # ∂loss/∂weight before the sum over tokens
        if ctx.needs_input_grad[1]:
            grad_weight = grad_x_hat_w.flatten(0, -2).sum(0)
        if ctx.needs_input_grad[0]:
            # ∂/∂x of x·rstd: rstd · (g_x̂ − x̂ · mean(g_x̂ · x̂)) with g_x̂ = grad · weight
            mean = (grad_x_hat_w @ weight).unsqueeze(-1).div_(x_hat.shape[-1])
            grad_x = (grad * weight).addcmul_(x_hat, mean, value=-1).mul_(rstd)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """`x · rsqrt(mean(x²) + eps) · weight`, normalised in fp32 then cast back (as Meta)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return _RMSNormFp32.apply(x, self.weight, self.eps)
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; no biases."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None, start_pos: int = 0):
        """x `[batch, seq, dim]` → `[batch, seq, dim]`."""
        b, t, _ = x.shape
        q = apply_rotary(self.wq(x).view(b, t, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.wk(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [batch, heads, seq, head_dim]
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal and t > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU: `w2(silu(w1 x) ⊙ w3 x)`."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`."""

    def __init__(self, layer_id: int, args: LlamaArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """Llama 3 language model: embeddings → blocks → final norm → output projection.

    `forward(tokens)` with tokens `[batch, seq]` returns logits `[batch, seq, vocab]`.
    `doc_ids` `[batch, seq]` turns on the document mask (positions restart per document).
    """

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[batch, seq, 1, head_dim // 2]` for positions `[batch, seq]`."""
        return rotary_tables(positions, inv_frequencies(self.args, device=positions.device))

    def prepare(self, tokens: torch.Tensor, doc_ids=None, positions=None, start_pos: int = 0):
        """Positions and mask shared by every layer, built once per forward."""
        b, t = tokens.shape
        if doc_ids is not None:
            mask = document_mask(doc_ids)
            if positions is None:
                positions = document_positions(doc_ids)
        else:
            mask = offset_causal_mask(t, start_pos, tokens.device)
        if positions is None:
            positions = torch.arange(start_pos, start_pos + t, device=tokens.device).expand(b, t)
        return self.rotary(positions), mask

    def forward_hidden(self, h, cos, sin, mask, caches=None, start_pos: int = 0) -> torch.Tensor:
        """Run the blocks and the final norm on embeddings `[batch, seq, dim]`."""
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, caches[i] if caches is not None else None, start_pos)
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        start_pos: int = 0,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens `[batch, seq]` → logits `[batch, seq, vocab]`, or `[n, vocab]` at the `n` positions where
        `logits_at` (bool `[batch, seq]`) is true."""
        (cos, sin), mask = self.prepare(tokens, doc_ids, positions, start_pos)
        h = self.forward_hidden(self.tok_embeddings(tokens), cos, sin, mask, caches, start_pos)
        return self.logits(h, logits_at)

    def logits(self, h: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """The output layer on normed hidden states `[batch, seq, dim]`, at every position or only where `at` is
        true (`[n, vocab]`): a loss on a few positions (answers, responses) skips the rest of the vocabulary
        projection, which is most of a small model's work."""
        return self.output(h if at is None else h[at]).float()

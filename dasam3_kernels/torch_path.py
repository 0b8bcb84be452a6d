"""The pure-PyTorch fast path (`backend="torch"`): any device, no compilation.

Two rewrites of the reference loop make it fast:

* Both W0 products run once per token as full-size GEMMs, because the routing weights of a token
  sum to one and W0 is shared by all experts:
  `y = W2 (Σ_j p_j h_j) + b2 + s Σ_j p_j B2[e_j] A2[e_j] h_j`.
* The low-rank terms of all experts are batched: the E factors are stacked into one `[E·r, ·]`
  matrix, and a token's slot j keeps only its expert's r columns (a one-hot segment mask), so each
  low-rank term is one small-K GEMM instead of E gathers.

On the CPU the per-slot elementwise work (low-rank expand, activation, combination, fc2 shrink) runs
over token chunks that stay in cache; the `[T, k, F]` hidden states are never materialised, neither
in the forward nor in the backward (which recomputes them from the saved pre-activation `x W1ᵀ + b1`,
so training saves what a dense FFN saves plus `[T, E·r]`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import activation_and_grad, activation_fn

# Elements of one [chunk, F] tile on the CPU: 2^17 fp32 = 512 KiB, so the handful of live tiles
# of a chunk fit in L2/L3.  GPUs take the whole token range in one chunk.
_CPU_TILE_ELEMENTS = 1 << 17


def _chunks(num_tokens: int, d_ff: int, device: torch.device) -> list[slice]:
    size = num_tokens if device.type != "cpu" else max(16, _CPU_TILE_ELEMENTS // max(d_ff, 1))
    return [slice(start, min(start + size, num_tokens)) for start in range(0, num_tokens, max(size, 1))]


def stack_down(A: torch.Tensor | None) -> torch.Tensor | None:
    """[E, r, n] → [E·r, n]: all experts' down-projections as one matrix."""
    return None if A is None else A.reshape(-1, A.shape[-1])


def stack_up(B: torch.Tensor | None) -> torch.Tensor | None:
    """[E, n, r] → [n, E·r]: all experts' up-projections side by side."""
    return None if B is None else B.permute(1, 0, 2).reshape(B.shape[1], -1)


def unstack_up(grad: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Inverse of `stack_up` for gradients: [n, E·r] → [E, n, r]."""
    return grad.view(grad.shape[0], num_experts, -1).permute(1, 0, 2).contiguous()


def _segment_masks(indices: torch.Tensor, num_experts: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """[k, T, E·r]: for slot j, ones on the r columns of expert e_tj."""
    one_hot = F.one_hot(indices.t(), num_experts).to(dtype)
    return one_hot.repeat_interleave(rank, dim=-1)


def _stacked_factors(A1, B1, A2, B2):
    return stack_down(A1), stack_up(B1), stack_down(A2), stack_up(B2)


def _num_experts(A1, A2) -> int:
    factor = A1 if A1 is not None else A2
    return 0 if factor is None else factor.shape[0]


def _slot_masks(indices, A1, A2, dtype):
    """Segment masks for whichever factors exist (None when the layer adapts nothing)."""
    factor = A1 if A1 is not None else A2
    return None if factor is None else _segment_masks(indices, factor.shape[0], factor.shape[1], dtype)


class _LowRankMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, weights, W1, b1, W2, b2, A1, B1, A2, B2, scale, activation, keep, dropout_p):
        act = activation_fn(activation)
        A1s, B1s, A2s, B2s = _stacked_factors(A1, B1, A2, B2)
        seg = _slot_masks(indices, A1, A2, x.dtype)
        p = weights.to(x.dtype)
        keep_scale = 1.0 / (1.0 - dropout_p)

        pre = F.linear(x, W1, b1)  # [T, F], the only [T, F] tensor saved for backward
        U = x @ A1s.t() if A1 is not None else None  # [T, E·r]
        mixed = torch.empty_like(pre)  # m = Σ_j p_j h_j
        V = torch.zeros_like(seg[0]) if A2 is not None else None  # Σ_j p_j (h_j A2ᵀ ⊙ seg_j)
        for rows in _chunks(x.shape[0], pre.shape[1], x.device):
            for j in range(indices.shape[1]):
                z = pre[rows] if U is None else torch.addmm(pre[rows], U[rows] * seg[j, rows], B1s.t(), alpha=scale)
                h = act(z)
                if keep is not None:
                    h = h * keep[rows, j, :] * keep_scale
                pj = p[rows, j, None]
                if j == 0:
                    torch.mul(h, pj, out=mixed[rows])
                else:
                    mixed[rows].addcmul_(h, pj)
                if V is not None:
                    V[rows].addcmul_(h @ A2s.t(), seg[j, rows] * pj)
        y = F.linear(mixed, W2)
        if V is not None:
            y.addmm_(V, B2s.t(), alpha=scale)
        if b2 is not None:  # Σ_j p_j b2, so that y is the reference's function of p even off the simplex
            y.addcmul_(p.sum(-1, keepdim=True), b2)

        ctx.save_for_backward(x, indices, weights, W1, W2, b2, A1, B1, A2, B2, pre, U, V, keep,
                              mixed if W2.requires_grad else None)
        ctx.config = (scale, activation, dropout_p)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, indices, weights, W1, W2, b2, A1, B1, A2, B2, pre, U, V, keep, mixed = ctx.saved_tensors
        scale, activation, dropout_p = ctx.config
        A1s, B1s, A2s, B2s = _stacked_factors(A1, B1, A2, B2)
        seg = _slot_masks(indices, A1, A2, x.dtype)
        p = weights.to(x.dtype)
        keep_scale = 1.0 / (1.0 - dropout_p)
        g = grad_y.contiguous()

        grad_mixed = g @ W2  # [T, F]
        gB2 = g @ B2s if A2 is not None else None  # [T, E·r]
        grad_pre = torch.empty_like(pre)
        grad_U = torch.zeros_like(U) if U is not None else None
        grad_A2s = torch.zeros_like(A2s) if A2 is not None else None
        grad_B1s = torch.zeros_like(B1s) if A1 is not None else None
        grad_p = torch.empty_like(p)
        for rows in _chunks(x.shape[0], pre.shape[1], x.device):
            for j in range(indices.shape[1]):
                U_j = None if U is None else U[rows] * seg[j, rows]
                z = pre[rows] if U_j is None else torch.addmm(pre[rows], U_j, B1s.t(), alpha=scale)
                h, dact = activation_and_grad(activation, z)
                if keep is not None:
                    kept = keep[rows, j, :].to(x.dtype) * keep_scale
                    h = h * kept
                pj = p[rows, j, None]
                grad_p[rows, j] = (h * grad_mixed[rows]).sum(-1)
                grad_h = grad_mixed[rows] * pj
                if A2 is not None:
                    seg_j = seg[j, rows]
                    grad_p[rows, j] += scale * ((h @ A2s.t()) * seg_j * gB2[rows]).sum(-1)
                    grad_v = gB2[rows] * seg_j * (scale * pj)
                    grad_h.addmm_(grad_v, A2s)
                    grad_A2s.addmm_(grad_v.t(), h)
                if keep is not None:
                    grad_h = grad_h * kept
                grad_z = grad_h.mul_(dact)
                if j == 0:
                    grad_pre[rows] = grad_z
                else:
                    grad_pre[rows] += grad_z
                if U_j is not None:
                    grad_U[rows].addcmul_(grad_z @ B1s, seg[j, rows], value=scale)
                    grad_B1s.addmm_(grad_z.t(), U_j, alpha=scale)
        if b2 is not None:
            grad_p += (g @ b2).unsqueeze(-1)

        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            grad_x = grad_pre @ W1
            if U is not None:
                grad_x.addmm_(grad_U, A1s)
        num_experts = _num_experts(A1, A2)
        return (
            grad_x,
            None,
            grad_p.to(weights.dtype) if need[2] else None,
            *frozen_ffn_grads(need, x, g, weights, grad_pre, mixed, b2),
            (grad_U.t() @ x).view_as(A1) if A1 is not None and need[7] else None,
            unstack_up(grad_B1s, num_experts) if A1 is not None and need[8] else None,
            grad_A2s.view_as(A2) if A2 is not None and need[9] else None,
            unstack_up(scale * (g.t() @ V), num_experts) if A2 is not None and need[10] else None,
            None, None, None, None,
        )


def frozen_ffn_grads(need: tuple[bool, ...], x: torch.Tensor, grad_y: torch.Tensor, weights: torch.Tensor,
                     grad_pre: torch.Tensor | None, mixed: torch.Tensor | None, fc2_bias: torch.Tensor | None):
    """Gradients of W1, b1, W2, b2 for whoever unfreezes the FFN (`need`: the op's needs_input_grad, its
    inputs ordered x, indices, weights, W1, b1, W2, b2, ...): plain GEMMs on what the backward has.

    grad_pre: dL/d(x W1ᵀ + b1) [T, F]; mixed: Σ_j p_j h_j [T, F]; y holds Σ_j p_j b2.
    """
    return (
        grad_pre.t() @ x if need[3] else None,
        grad_pre.sum(0) if need[4] else None,
        grad_y.t() @ mixed if need[5] else None,
        (grad_y * weights.sum(-1, keepdim=True).to(grad_y.dtype)).sum(0).to(fc2_bias.dtype) if need[6] else None,
    )


def lowrank_moe(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    fc1_A: torch.Tensor | None,
    fc1_B: torch.Tensor | None,
    fc2_A: torch.Tensor | None,
    fc2_B: torch.Tensor | None,
    scale: float,
    activation: str,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same contract as `reference.lowrank_moe_reference`; differentiable in every tensor."""
    return _LowRankMoE.apply(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                             fc1_A, fc1_B, fc2_A, fc2_B, scale, activation, dropout_mask, dropout_p)


def full_moe(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    activation: str,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Mixture of full experts, (token, slot) pairs grouped by expert: one GEMM pair per expert.

    Same contract as `reference.full_moe_reference`; gradients from autograd.
    """
    act = activation_fn(activation)
    num_experts = fc1_weight.shape[0]
    pairs = indices.reshape(-1)
    order = pairs.argsort(stable=True)
    token = order // indices.shape[1]
    counts = torch.bincount(pairs, minlength=num_experts).tolist()
    keep = None if dropout_mask is None else dropout_mask.reshape(pairs.shape[0], -1)[order]
    outputs = []
    for e, (rows, xs) in enumerate(zip(torch.arange(len(order), device=x.device).split(counts), x[token].split(counts))):
        h = act(F.linear(xs, fc1_weight[e], None if fc1_bias is None else fc1_bias[e]))
        if keep is not None:
            h = h * keep[rows] / (1.0 - dropout_p)
        outputs.append(F.linear(h, fc2_weight[e], None if fc2_bias is None else fc2_bias[e]))
    out = torch.cat(outputs) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, out)

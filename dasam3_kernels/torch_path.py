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


def _segment_masks(indices: torch.Tensor, num_experts: int, rank: int) -> torch.Tensor:
    """bool [k, T, E·r]: for slot j, True on the r columns of expert e_tj."""
    one_hot = F.one_hot(indices.t(), num_experts).bool()
    return one_hot.repeat_interleave(rank, dim=-1)


def _stacked_factors(*factors):
    """(A, B) pairs → their stacked forms (`stack_down`, `stack_up`), None kept."""
    return [stack_down(f) if i % 2 == 0 else stack_up(f) for i, f in enumerate(factors)]


def _first_factor(*factors) -> torch.Tensor | None:
    return next((f for f in factors if f is not None), None)


def _slot_masks(indices, *down_factors):
    """Segment masks for whichever factors exist (None when the layer adapts nothing)."""
    factor = _first_factor(*down_factors)
    return None if factor is None else _segment_masks(indices, factor.shape[0], factor.shape[1])


def _expand(base: torch.Tensor, U: torch.Tensor | None, seg_j: torch.Tensor, Bs: torch.Tensor | None,
            scale: float):
    """(base + s (U ⊙ seg_j) Bsᵀ, U ⊙ seg_j): one slot's pre-activation from the shared product `base`.

    The mask is a `where`, not a product, so a non-finite token leaves only its own expert's columns
    non-finite (NaN · 0 is NaN): the other experts' gradients stay clean, as in the reference.
    """
    if U is None:
        return base, None
    U_j = torch.where(seg_j, U, 0.0)
    return torch.addmm(base, U_j, Bs.t(), alpha=scale), U_j


def _finite_rows(product: torch.Tensor) -> torch.Tensor:
    """bool [rows]: which rows of M are finite, read off `product = M @ N` for a finite N.

    A NaN or inf anywhere in a row of M makes every entry of that row of the product non-finite, so
    one column of a product the pass computes anyway replaces a scan of M.
    """
    return product[:, 0].isfinite() if product.shape[1] else torch.ones_like(product[:, 0], dtype=torch.bool)


def _add_isolated(acc: torch.Tensor, small: torch.Tensor, big: torch.Tensor, finite: torch.Tensor,
                  seg: torch.Tensor, alpha: float = 1.0, scratch: bool = False) -> None:
    """acc [E·r, n] += alpha · smallᵀ [E·r, rows] @ big [rows, n], token by token as the reference sums it.

    Each token only reaches the columns of `small` its experts own (seg: bool [rows, E·r]), but a
    non-finite row of `big` would spread NaN to every expert through the shared GEMM: such rows are
    left out, and the experts that row belongs to get the NaN the reference gives them.
    scratch: `big` is a temporary of the caller's, zeroed in place instead of copied.
    """
    clean = big.masked_fill_(~finite[:, None], 0.0) if scratch else torch.where(finite[:, None], big, 0.0)
    acc.addmm_(small.t(), clean, alpha=alpha)
    poisoned = (seg & ~finite[:, None]).any(0)
    acc.masked_fill_(poisoned[:, None], float("nan"))


class _LowRankMoE(torch.autograd.Function):
    """Plain (h = act(u)) and gated (h = act(g) ⊙ u) mixtures of low-rank experts; gated when Wg is given.

    Inputs: x, indices, weights, W1, b1, W2, b2, A1, B1, A2, B2, scale, activation, keep, dropout_p,
    Wg, bg, Ag, Bg (the gate's frozen weights and lora factors, None for a plain FFN).
    """

    @staticmethod
    def forward(ctx, x, indices, weights, W1, b1, W2, b2, A1, B1, A2, B2, scale, activation, keep, dropout_p,
                Wg, bg, Ag, Bg):
        act = activation_fn(activation)
        A1s, B1s, A2s, B2s, Ags, Bgs = _stacked_factors(A1, B1, A2, B2, Ag, Bg)
        seg = _slot_masks(indices, A1, A2, Ag)
        p = weights.to(x.dtype)
        keep_scale = 1.0 / (1.0 - dropout_p)

        pre = F.linear(x, W1, b1)  # [T, F]: x W1ᵀ + b1, saved for backward (and x W_gᵀ + b_g when gated)
        pre_g = F.linear(x, Wg, bg) if Wg is not None else None
        U = x @ A1s.t() if A1 is not None else None  # [T, E·r]
        Ug = x @ Ags.t() if Ag is not None else None
        mixed = torch.empty_like(pre)  # m = Σ_j p_j h_j
        V = torch.zeros(x.shape[0], A2s.shape[0], dtype=x.dtype, device=x.device) if A2 is not None else None
        for rows in _chunks(x.shape[0], pre.shape[1], x.device):
            for j in range(indices.shape[1]):
                seg_j = None if seg is None else seg[j, rows]
                u, _ = _expand(pre[rows], None if U is None else U[rows], seg_j, B1s, scale)
                if pre_g is None:
                    h = act(u)
                else:
                    g, _ = _expand(pre_g[rows], None if Ug is None else Ug[rows], seg_j, Bgs, scale)
                    h = act(g) * u
                if keep is not None:
                    h = h * keep[rows, j, :] * keep_scale
                pj = p[rows, j, None]
                if j == 0:
                    torch.mul(h, pj, out=mixed[rows])
                else:
                    mixed[rows].addcmul_(h, pj)
                if V is not None:
                    V[rows] += torch.where(seg_j, (h @ A2s.t()) * pj, 0.0)
        y = F.linear(mixed, W2)
        if V is not None:
            y.addmm_(V, B2s.t(), alpha=scale)
        if b2 is not None:  # Σ_j p_j b2, so that y is the reference's function of p even off the simplex
            y.addcmul_(p.sum(-1, keepdim=True), b2)

        ctx.save_for_backward(x, indices, weights, W1, W2, b2, A1, B1, A2, B2, pre, U, V, keep,
                              mixed if W2.requires_grad else None, Wg, Ag, Bg, pre_g, Ug)
        ctx.config = (scale, activation, dropout_p)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, indices, weights, W1, W2, b2, A1, B1, A2, B2, pre, U, V, keep, mixed, Wg, Ag, Bg, pre_g, Ug = \
            ctx.saved_tensors
        scale, activation, dropout_p = ctx.config
        A1s, B1s, A2s, B2s, Ags, Bgs = _stacked_factors(A1, B1, A2, B2, Ag, Bg)
        seg = _slot_masks(indices, A1, A2, Ag)
        p = weights.to(x.dtype)
        keep_scale = 1.0 / (1.0 - dropout_p)
        g = grad_y.contiguous()
        zeros = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731

        grad_mixed = g @ W2  # [T, F]
        gB2 = g @ B2s if A2 is not None else None  # [T, E·r]
        grad_pre, grad_pre_g = torch.empty_like(pre), None if pre_g is None else torch.empty_like(pre_g)
        grad_U, grad_Ug = zeros(U), zeros(Ug)
        # the up-projection gradients accumulate transposed, as [E·r, n] like the down-projections'
        grad_A2s = None if A2s is None else torch.zeros_like(A2s)
        grad_B1s, grad_Bgs = (None if f is None else f.new_zeros(f.shape[1], f.shape[0]) for f in (B1s, Bgs))
        grad_p = torch.empty_like(p)
        for rows in _chunks(x.shape[0], pre.shape[1], x.device):
            for j in range(indices.shape[1]):
                seg_j = None if seg is None else seg[j, rows]
                u, U_j = _expand(pre[rows], None if U is None else U[rows], seg_j, B1s, scale)
                if pre_g is None:
                    h, dact = activation_and_grad(activation, u)
                else:
                    z_g, Ug_j = _expand(pre_g[rows], None if Ug is None else Ug[rows], seg_j, Bgs, scale)
                    a, dact = activation_and_grad(activation, z_g)
                    h = a * u
                if keep is not None:
                    kept = keep[rows, j, :].to(x.dtype) * keep_scale
                    h = h * kept
                pj = p[rows, j, None]
                grad_p[rows, j] = (h * grad_mixed[rows]).sum(-1)
                grad_h = grad_mixed[rows] * pj
                if A2 is not None:
                    hA2 = h @ A2s.t()
                    grad_p[rows, j] += scale * torch.where(seg_j, hA2 * gB2[rows], 0.0).sum(-1)
                    grad_v = torch.where(seg_j, gB2[rows] * (scale * pj), 0.0)
                    grad_h.addmm_(grad_v, A2s)
                    _add_isolated(grad_A2s, grad_v, h, _finite_rows(hA2), seg_j, scratch=True)  # h: done with
                if keep is not None:
                    grad_h = grad_h * kept
                if pre_g is None:
                    grad_u = grad_h.mul_(dact)
                else:
                    grad_u, grad_zg = grad_h * a, grad_h.mul_(u).mul_(dact)
                    _accumulate_slot(grad_pre_g, rows, j, grad_zg, Ug_j, Bgs, grad_Ug, grad_Bgs, seg_j, scale)
                _accumulate_slot(grad_pre, rows, j, grad_u, U_j, B1s, grad_U, grad_B1s, seg_j, scale)
        if b2 is not None:
            grad_p += (g @ b2).unsqueeze(-1)

        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:
            grad_x = grad_pre @ W1
            for grad_pre_proj, W in ((grad_pre_g, Wg), (grad_U, A1s), (grad_Ug, Ags)):
                if grad_pre_proj is not None:
                    grad_x.addmm_(grad_pre_proj, W)
        routed = None if seg is None else seg.any(0)  # [T, E·r]: the columns of every expert a token uses
        down_shared = _first_factor(U, Ug)  # x @ Aᵀ, which flags the non-finite rows of x
        down_grad = lambda grad, A: _isolated(grad, x, _finite_rows(down_shared), routed).view_as(A)  # noqa: E731
        up_grad = lambda grad_t: unstack_up(grad_t.t(), _first_factor(A1, A2, Ag).shape[0])  # noqa: E731
        return (
            grad_x,
            None,
            grad_p.to(weights.dtype) if need[2] else None,
            *frozen_ffn_grads(need, x, g, weights, grad_pre, mixed, b2),
            down_grad(grad_U, A1) if A1 is not None and need[7] else None,
            up_grad(grad_B1s) if A1 is not None and need[8] else None,
            grad_A2s.view_as(A2) if A2 is not None and need[9] else None,
            up_grad(_isolated(V, g, _finite_rows(gB2), routed, scale)) if A2 is not None and need[10] else None,
            None, None, None, None,
            *frozen_gate_grads(need[15:17], x, grad_pre_g),
            down_grad(grad_Ug, Ag) if Ag is not None and need[17] else None,
            up_grad(grad_Bgs) if Ag is not None and need[18] else None,
        )


def _accumulate_slot(grad_pre, rows, j, grad_z, U_j, Bs, grad_U, grad_Bt, seg_j, scale) -> None:
    """One slot's share of dL/d(pre-activation), dL/dU and the up-projection gradient (as [E·r, n]).

    grad_z is the caller's temporary and is overwritten."""
    if j == 0:
        grad_pre[rows] = grad_z
    else:
        grad_pre[rows] += grad_z
    if U_j is not None:
        gzB = grad_z @ Bs
        grad_U[rows] += torch.where(seg_j, gzB, 0.0) * scale
        _add_isolated(grad_Bt, U_j, grad_z, _finite_rows(gzB), seg_j, alpha=scale, scratch=True)


def _isolated(small: torch.Tensor, big: torch.Tensor, finite: torch.Tensor, seg: torch.Tensor,
              alpha: float = 1.0) -> torch.Tensor:
    """alpha · smallᵀ @ big [E·r, n], a non-finite row of `big` reaching only its own experts."""
    acc = torch.zeros(small.shape[1], big.shape[1], dtype=big.dtype, device=big.device)
    _add_isolated(acc, small, big, finite, seg, alpha)
    return acc


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


def frozen_gate_grads(need: tuple[bool, bool], x: torch.Tensor,
                      grad_pre_g: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a gated FFN's W_g and b_g for whoever unfreezes them (`need`: for the weight, the bias).

    grad_pre_g: dL/d(x W_gᵀ + b_g) [T, F], or None for a plain FFN (then no gradients).
    """
    if grad_pre_g is None:
        return None, None
    return grad_pre_g.t() @ x if need[0] else None, grad_pre_g.sum(0) if need[1] else None


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
                             fc1_A, fc1_B, fc2_A, fc2_B, scale, activation, dropout_mask, dropout_p,
                             None, None, None, None)


def gated_moe(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    gate_A: torch.Tensor | None,
    gate_B: torch.Tensor | None,
    fc1_A: torch.Tensor | None,
    fc1_B: torch.Tensor | None,
    fc2_A: torch.Tensor | None,
    fc2_B: torch.Tensor | None,
    scale: float,
    activation: str,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same contract as `reference.gated_moe_reference`; differentiable in every tensor.

    W_g x and W1 x run once per token, W2 once on Σ_j p_j h_j, as in `lowrank_moe`.
    """
    return _LowRankMoE.apply(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                             fc1_A, fc1_B, fc2_A, fc2_B, scale, activation, dropout_mask, dropout_p,
                             gate_weight, gate_bias, gate_A, gate_B)


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
    gate_weight: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixture of full experts, (token, slot) pairs grouped by expert: one GEMM pair (triple, gated) per expert.

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
        u = F.linear(xs, fc1_weight[e], None if fc1_bias is None else fc1_bias[e])
        if gate_weight is None:
            h = act(u)
        else:
            h = act(F.linear(xs, gate_weight[e], None if gate_bias is None else gate_bias[e])) * u
        if keep is not None:
            h = h * keep[rows] / (1.0 - dropout_p)
        outputs.append(F.linear(h, fc2_weight[e], None if fc2_bias is None else fc2_bias[e]))
    out = torch.cat(outputs) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, out)

"""The reference implementation: SPEC section 1's formula as a plain per-expert loop.

This is the oracle every other backend is tested against, so it is written for obviousness, not
speed: each expert applies its own `W0 + ΔW` to the tokens routed to it, and nothing is shared
between experts (the fast paths' "W0 once per token" rewrite is deliberately not used here).
Gradients come from autograd.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .activations import activation_fn

ExpertFn = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _apply_dropout(h: torch.Tensor, keep: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    return h if keep is None else h * keep.to(h.dtype) / (1.0 - dropout_p)


def _per_expert_loop(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, expert: ExpertFn,
    dropout_mask: torch.Tensor | None,
) -> torch.Tensor:
    """y_t = Σ_j weights[t, j] · expert(e_tj, x_t).  x: [T, D], indices/weights: [T, k]."""
    y = torch.zeros_like(x)
    for e in indices.unique().tolist():
        for slot in range(indices.shape[1]):
            rows = (indices[:, slot] == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            keep = None if dropout_mask is None else dropout_mask[rows, slot]
            out = expert(e, x[rows], keep)
            y = y.index_add(0, rows, weights[rows, slot, None].to(out.dtype) * out)
    return y


def _lowrank(x: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor | None, e: int, scale: float):
    """s · B[e] A[e] x, or 0 when the projection is not adapted."""
    if A is None:
        return 0.0
    return scale * F.linear(F.linear(x, A[e]), B[e])


def lowrank_moe_reference(
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
    """Mixture of low-rank experts over a frozen FFN (DPE).

    x: [T, D]; indices, weights: [T, k]; fc1_weight: [F, D]; fc2_weight: [D, F];
    fc1_A: [E, r, D], fc1_B: [E, F, r], fc2_A: [E, r, F], fc2_B: [E, D, r] (None: not adapted);
    dropout_mask: bool [T, k, F], True = keep.  Returns y: [T, D].
    """
    act = activation_fn(activation)

    def expert(e: int, xe: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        h = act(F.linear(xe, fc1_weight, fc1_bias) + _lowrank(xe, fc1_A, fc1_B, e, scale))
        h = _apply_dropout(h, keep, dropout_p)
        return F.linear(h, fc2_weight, fc2_bias) + _lowrank(h, fc2_A, fc2_B, e, scale)

    return _per_expert_loop(x, indices, weights, expert, dropout_mask)


def gated_moe_reference(
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
    """Mixture of low-rank experts over a frozen gated FFN `fc2(act(gate(x)) ⊙ fc1(x))` (SwiGLU, GeGLU).

    As `lowrank_moe_reference`, plus gate_weight: [F, D], gate_bias: [F] or None, gate_A: [E, r, D],
    gate_B: [E, F, r] (None: the gate is not adapted).  Per slot, with e its expert:
    g = W_g x + b_g + s B_g[e] A_g[e] x,  u = W1 x + b1 + s B1[e] A1[e] x,  h = act(g) ⊙ u.
    """
    act = activation_fn(activation)

    def expert(e: int, xe: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        g = F.linear(xe, gate_weight, gate_bias) + _lowrank(xe, gate_A, gate_B, e, scale)
        u = F.linear(xe, fc1_weight, fc1_bias) + _lowrank(xe, fc1_A, fc1_B, e, scale)
        h = _apply_dropout(act(g) * u, keep, dropout_p)
        return F.linear(h, fc2_weight, fc2_bias) + _lowrank(h, fc2_A, fc2_B, e, scale)

    return _per_expert_loop(x, indices, weights, expert, dropout_mask)


def full_moe_reference(
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
    """Mixture of full experts (standard MoE; the "w/o DPE" ablation).

    x: [T, D]; fc1_weight: [E, F, D], fc1_bias: [E, F], fc2_weight: [E, D, F], fc2_bias: [E, D];
    gate_weight: [E, F, D], gate_bias: [E, F] for a gated FFN (h = act(gate x) ⊙ fc1 x), else None.
    """
    act = activation_fn(activation)
    pick = lambda t, e: None if t is None else t[e]  # noqa: E731

    def expert(e: int, xe: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        u = F.linear(xe, fc1_weight[e], pick(fc1_bias, e))
        h = act(u) if gate_weight is None else act(F.linear(xe, gate_weight[e], pick(gate_bias, e))) * u
        return F.linear(_apply_dropout(h, keep, dropout_p), fc2_weight[e], pick(fc2_bias, e))

    return _per_expert_loop(x, indices, weights, expert, dropout_mask)

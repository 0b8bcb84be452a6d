"""The Triton backend: the fused kernels as `torch.ops.dasam3.triton_*` custom ops, with autograd.

Ops (each with a fake implementation, so `torch.compile` traces through them without graph breaks):

* `triton_route(x, weight, bias, ctx_bias, top_k) -> (weights, probs, indices)` and its backward
  `triton_route_backward(...) -> (grad_logits, grad_x)`: the fused router (`triton_router`).
* `triton_lowrank_moe(x, indices, weights, W1, b1, W2, b2, A1, B1, A2, B2, scale, activation, atomic,
  Wg=None, bg=None, Ag=None, Bg=None) -> (y, m, V)`: up-projection kernel then down-projection kernel;
  a gated FFN (h = act(g) ⊙ u) when the gate's weight Wg is given (`gated_moe`).  m = Σ_j p_j h_j
  [T, F] and V = Σ_j p_j (h_j A2ᵀ ⊙ seg_j) [T, E·r] are returned for autograd only.
* `triton_lowrank_moe_backward(...) -> (dx, d weights, dA1, dB1, dA2, dB2, grad_pre, dAg, dBg)`: the
  frozen GEMMs (cuBLAS), the backward kernel, the down-projection kernel reused for dx, and small GEMMs
  (dA1, dAg = grad_Uᵀ x, dB2 = s gᵀ V).  grad_pre is [T, F], gated [T, 2F] (fc1's, then the gate's).

Saved for backward by `triton_lowrank_moe` (the activations; the frozen and lora weights are
parameters): x [T, D], indices [T, k] int64, weights [T, k], V [T, E·r] in fp32 — the pre-activations
`[T, k, F]` are recomputed from x.  Only if someone unfreezes fc2's weight is m [T, F] saved too
(for dW2 = gᵀ m); unfrozen fc1/fc2 weights and biases get their gradients from plain torch GEMMs
here, so the fused path stays correct for any `requires_grad`.

Cross-tile reductions are deterministic (split buffers, then a sum) unless `atomic=True` (or the
environment variable DASAM3_TRITON_ATOMICS=1), which adds with float atomics instead.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .activations import check_activation
from .routing import check_context_rows
from .triton_backward import up_projection_backward
from .torch_path import frozen_ffn_grads, frozen_gate_grads, unstack_up
from .triton_common import Gate, device_error
from .triton_down_proj import down_projection
from .triton_router import route_backward, route_forward
from .triton_up_proj import up_projection

__all__ = ["ATOMIC_REDUCTIONS", "device_error", "gated_moe", "lowrank_moe", "route"]

ATOMIC_REDUCTIONS = os.environ.get("DASAM3_TRITON_ATOMICS") == "1"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lora_shape(A: Tensor | None) -> tuple[int, int]:
    return (0, 0) if A is None else (A.shape[0], A.shape[1])


def check_expert_indices(indices: Tensor, num_experts: int) -> None:
    """An index outside [0, E) would select no expert's columns in the kernels: a silent drop, so it is
    an error, as in the compiled ops.  On a GPU the check is a device-side assert (reading the values
    back would stall the host on every call and forbid CUDA graph capture); on the CPU it names them."""
    if indices.numel() == 0:
        return
    message = f"lowrank_moe: indices must lie in [0, {num_experts})"
    if indices.is_cuda:
        torch._assert_async(((indices >= 0) & (indices < num_experts)).all(), message)
        return
    low, high = (int(v) for v in torch.aminmax(indices))
    if low < 0 or high >= num_experts:
        raise ValueError(f"{message}, got values in [{low}, {high}]")


# -- router ----------------------------------------------------------------------------------------


@torch.library.custom_op("dasam3::triton_route", mutates_args=())
def _route_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], ctx_bias: Optional[Tensor],
              top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    # The integer output goes last: opcheck's autograd test sums the outputs into the first one's dtype.
    indices, weights, probs = route_forward(x, weight, bias, ctx_bias, top_k)
    return weights, probs, indices


@_route_op.register_fake
def _(x, weight, bias, ctx_bias, top_k):
    T, E = x.shape[0], weight.shape[0]
    return (x.new_empty(T, top_k, dtype=torch.float32), x.new_empty(T, E, dtype=torch.float32),
            x.new_empty(T, top_k, dtype=torch.int64))


@torch.library.custom_op("dasam3::triton_route_backward", mutates_args=())
def _route_backward_op(grad_weights: Tensor, grad_probs: Tensor, x: Tensor, weight: Tensor, indices: Tensor,
                       weights: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    return route_backward(grad_weights, grad_probs, x, weight, indices, weights, probs)


@_route_backward_op.register_fake
def _(grad_weights, grad_probs, x, weight, indices, weights, probs):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32), x.new_empty(x.shape)


def _route_setup_context(ctx, inputs, output):
    x, weight, bias, ctx_bias, _ = inputs
    weights, probs, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(x, weight, indices, weights, probs)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.ctx_bias_meta = None if ctx_bias is None else (ctx_bias.shape[0], ctx_bias.dtype)


def _route_autograd_backward(ctx, grad_weights, grad_probs, _grad_indices):
    x, weight, indices, weights, probs = ctx.saved_tensors
    grad_logits, grad_x = torch.ops.dasam3.triton_route_backward(grad_weights, grad_probs, x, weight, indices,
                                                                  weights, probs)
    need = ctx.needs_input_grad
    grad_weight = (grad_logits.t() @ x.float()).to(weight.dtype) if need[1] else None
    grad_bias = grad_logits.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None and need[2] else None
    grad_ctx = None
    if ctx.ctx_bias_meta is not None and need[3]:
        rows, dtype = ctx.ctx_bias_meta
        grad_ctx = grad_logits.view(rows, x.shape[0] // max(rows, 1), -1).sum(1).to(dtype)  # per-sample sum
    return grad_x if need[0] else None, grad_weight, grad_bias, grad_ctx, None


_route_op.register_autograd(_route_autograd_backward, setup_context=_route_setup_context)


def route(x: Tensor, weight: Tensor, bias: Tensor | None, ctx_bias: Tensor | None,
          top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The fused router, same contract as `routing.route`.

    x: [T, D]; weight: [E, D]; bias: [E]; ctx_bias: [R, E] with R dividing T (the context projection,
    computed once per sample).  Returns indices [T, k] int64, weights [T, k] fp32, probs [T, E] fp32.
    """
    num_tokens, num_experts = x.shape[0], weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if ctx_bias is not None:
        check_context_rows(ctx_bias.shape[0], num_tokens)
    weights, probs, indices = _route_op(x, weight, bias, ctx_bias, top_k)
    return indices, weights, probs


# -- mixture of low-rank experts -------------------------------------------------------------------


def _gate(weight: Tensor | None, bias: Tensor | None, A: Tensor | None, B: Tensor | None) -> Gate | None:
    return None if weight is None else Gate(weight, bias, A, B)


@torch.library.custom_op("dasam3::triton_lowrank_moe", mutates_args=())
def _lowrank_moe_op(x: Tensor, indices: Tensor, weights: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
                    fc2_weight: Tensor, fc2_bias: Optional[Tensor], fc1_A: Optional[Tensor], fc1_B: Optional[Tensor],
                    fc2_A: Optional[Tensor], fc2_B: Optional[Tensor], scale: float, activation: str,
                    atomic: bool, gate_weight: Optional[Tensor] = None, gate_bias: Optional[Tensor] = None,
                    gate_A: Optional[Tensor] = None, gate_B: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    factor = next((f for f in (fc1_A, gate_A, fc2_A) if f is not None), None)
    if factor is not None:
        check_expert_indices(indices, factor.shape[0])
    mixed, lora_mid = up_projection(x, indices, weights, fc1_weight, fc1_bias, fc1_A, fc1_B, fc2_A, scale,
                                    activation, atomic, _gate(gate_weight, gate_bias, gate_A, gate_B))
    factor = None if fc2_B is None else fc2_B.transpose(1, 2)  # [E, r, D]
    y = down_projection(mixed, fc2_weight.t(), lora_mid, factor, scale, fc2_bias, weights)
    if lora_mid is None:
        lora_mid = x.new_empty(x.shape[0], 0, dtype=_acc_dtype(x.dtype))
    return y, mixed, lora_mid


@_lowrank_moe_op.register_fake
def _(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B, scale,
      activation, atomic, gate_weight=None, gate_bias=None, gate_A=None, gate_B=None):
    T, F = x.shape[0], fc1_weight.shape[0]
    E, R = _lora_shape(fc2_A)
    return x.new_empty(T, x.shape[1]), x.new_empty(T, F), x.new_empty(T, E * R, dtype=_acc_dtype(x.dtype))


def input_grad(down: list[tuple[Tensor, Tensor | None]], grad_pre: Tensor, grad_u: Tensor | None) -> Tensor:
    """dx = Σ over the projections x feeds (fc1, and the gate when gated) of grad_pre W + grad_U A, as one
    down-projection launch: `down` holds each projection's (W [F, D], A [E, r, D] or None)."""
    weight = down[0][0] if len(down) == 1 else torch.cat([w for w, _ in down])  # [n·F, D]
    factors = [A for _, A in down if A is not None]
    factor = None if not factors else factors[0] if len(factors) == 1 else torch.cat(factors)  # [n·E, r, D]
    return down_projection(grad_pre, weight, grad_u, factor)


def _down_factor_grads(grads, x: Tensor, factors: list[Tensor | None], acc: torch.dtype) -> list[Tensor | None]:
    """dA1, dA_g = grad_Uᵀ x, one small GEMM per projection on its columns of grad_U (fc1's, then the gate's)."""
    adapted = [A for A in factors if A is not None]
    if not adapted:
        return [None] * len(factors)
    columns = iter(grads.grad_u.split([A.shape[0] * A.shape[1] for A in adapted], dim=1))
    return [None if A is None else (next(columns).t() @ x.to(acc)).view(A.shape).to(A.dtype) for A in factors]


@torch.library.custom_op("dasam3::triton_lowrank_moe_backward", mutates_args=())
def _lowrank_moe_backward_op(
    grad_y: Tensor, x: Tensor, indices: Tensor, weights: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor],
    fc2_weight: Tensor, fc2_bias: Optional[Tensor], fc1_A: Optional[Tensor], fc1_B: Optional[Tensor],
    fc2_A: Optional[Tensor], fc2_B: Optional[Tensor], lora_mid: Tensor, scale: float, activation: str,
    atomic: bool, compute_dx: bool, gate_weight: Optional[Tensor] = None, gate_bias: Optional[Tensor] = None,
    gate_A: Optional[Tensor] = None, gate_B: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    gate = _gate(gate_weight, gate_bias, gate_A, gate_B)
    grads = up_projection_backward(grad_y, x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc1_A, fc1_B,
                                   fc2_A, fc2_B, scale, activation, atomic, gate)
    acc = _acc_dtype(x.dtype)
    none = lambda: x.new_empty(0)  # noqa: E731  (a fresh one per absent gradient: outputs may not alias)
    down = [(fc1_weight, fc1_A)] + ([(gate_weight, gate_A)] if gate is not None else [])
    grad_x = input_grad(down, grads.grad_pre, grads.grad_u) if compute_dx else none()
    grad_weights = grads.grad_weights
    if fc2_bias is not None:  # y's Σ_j p_j b2 term
        grad_weights = grad_weights + (grad_y.to(acc) @ fc2_bias.to(acc)).unsqueeze(-1)
    grad_A1, grad_Ag = _down_factor_grads(grads, x, [fc1_A, gate_A], acc)
    grad_B2 = None
    if fc2_A is not None:
        grad_B2 = unstack_up(scale * (grad_y.to(acc).t() @ lora_mid), fc2_B.shape[0]).to(fc2_B.dtype)
    up_grad = lambda grad, B: None if B is None else grad.to(B.dtype)  # noqa: E731
    grad_A2 = None if fc2_A is None else grads.grad_fc2_A.to(fc2_A.dtype)
    present = lambda t: none() if t is None else t  # noqa: E731
    return (grad_x, grad_weights.to(weights.dtype), present(grad_A1), present(up_grad(grads.grad_fc1_B, fc1_B)),
            present(grad_A2), present(grad_B2), grads.grad_pre, present(grad_Ag),
            present(up_grad(grads.grad_gate_B, gate_B)))


@_lowrank_moe_backward_op.register_fake
def _(grad_y, x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B, lora_mid,
      scale, activation, atomic, compute_dx, gate_weight=None, gate_bias=None, gate_A=None, gate_B=None):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    d_ff = fc1_weight.shape[0] * (1 if gate_weight is None else 2)
    return (x.new_empty(x.shape) if compute_dx else x.new_empty(0), like(weights), like(fc1_A), like(fc1_B),
            like(fc2_A), like(fc2_B), x.new_empty(x.shape[0], d_ff), like(gate_A), like(gate_B))


def _lowrank_moe_setup_context(ctx, inputs, output):
    x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B, *config = inputs
    _, mixed, lora_mid = output
    ctx.mark_non_differentiable(mixed, lora_mid)
    gate = (*config[3:], None, None, None, None)[:4]  # the gate's tensors (a call that omits them: None)
    ctx.save_for_backward(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B,
                          lora_mid, mixed if fc2_weight.requires_grad else None, *gate)
    ctx.config = config[:3]  # scale, activation, atomic
    ctx.num_inputs = len(inputs)


def _lowrank_moe_autograd_backward(ctx, grad_y, _grad_mixed, _grad_lora_mid):
    x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B, lora_mid, mixed, \
        *gate = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_weights, grad_A1, grad_B1, grad_A2, grad_B2, grad_pre, grad_Ag, grad_Bg = \
        torch.ops.dasam3.triton_lowrank_moe_backward(grad_y, x, indices, weights, fc1_weight, fc1_bias, fc2_weight,
                                                     fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B, lora_mid, *ctx.config,
                                                     need[0], *gate)
    d_ff = fc1_weight.shape[0]
    gated = gate[0] is not None
    need = (*need, False, False, False, False)  # (the gate's inputs, when a call omits them)
    pick = lambda grad, i: grad if need[i] else None  # noqa: E731
    grads = (pick(grad_x, 0), None, pick(grad_weights, 2),
             *frozen_ffn_grads(need, x, grad_y, weights, grad_pre[:, :d_ff], mixed, fc2_bias), pick(grad_A1, 7),
             pick(grad_B1, 8), pick(grad_A2, 9), pick(grad_B2, 10), None, None, None,
             *frozen_gate_grads(need[14:16], x, grad_pre[:, d_ff:] if gated else None),
             pick(grad_Ag, 16), pick(grad_Bg, 17))
    return grads[:ctx.num_inputs]


_lowrank_moe_op.register_autograd(_lowrank_moe_autograd_backward, setup_context=_lowrank_moe_setup_context)


def lowrank_moe(x: Tensor, indices: Tensor, weights: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None,
                fc2_weight: Tensor, fc2_bias: Tensor | None, fc1_A: Tensor | None, fc1_B: Tensor | None,
                fc2_A: Tensor | None, fc2_B: Tensor | None, scale: float, activation: str, *,
                atomic: bool | None = None) -> Tensor:
    """Mixture of low-rank experts with the fused kernels; the contract of `reference.lowrank_moe_reference`.

    x: [T, D]; indices, weights: [T, k]; fc1_weight: [F, D]; fc2_weight: [D, F]; fc1_A: [E, r, D],
    fc1_B: [E, F, r], fc2_A: [E, r, F], fc2_B: [E, D, r] (None: not adapted).  Returns y: [T, D].
    `atomic` (default: DASAM3_TRITON_ATOMICS=1) trades the deterministic split reductions for float atomics.
    """
    return _mixture(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B,
                    scale, activation, atomic)


def _mixture(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B, scale,
             activation, atomic, *gate) -> Tensor:
    """The op's forward output for both layer kinds; `gate`: (W_g, b_g, A_g, B_g), empty for a plain FFN."""
    check_activation(activation)
    if x.dim() != 2 or indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(f"expected x [T, D] and indices, weights [T, k], got shapes {tuple(x.shape)}, "
                         f"{tuple(indices.shape)}, {tuple(weights.shape)}")
    atomic = ATOMIC_REDUCTIONS if atomic is None else atomic
    y, _, _ = _lowrank_moe_op(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B,
                              fc2_A, fc2_B, float(scale), activation, bool(atomic), *gate)
    return y


def gated_moe(x: Tensor, indices: Tensor, weights: Tensor, gate_weight: Tensor, gate_bias: Tensor | None,
              fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
              gate_A: Tensor | None, gate_B: Tensor | None, fc1_A: Tensor | None, fc1_B: Tensor | None,
              fc2_A: Tensor | None, fc2_B: Tensor | None, scale: float, activation: str, *,
              atomic: bool | None = None) -> Tensor:
    """Mixture of low-rank experts over a gated FFN (SwiGLU/GeGLU) with the fused kernels; the contract
    of `reference.gated_moe_reference`.  As `lowrank_moe`, plus gate_weight: [F, D], gate_bias: [F],
    gate_A: [E, r, D], gate_B: [E, F, r] (None: the gate is not adapted).  Returns y: [T, D].
    """
    if gate_weight.shape != fc1_weight.shape:
        raise ValueError(f"gate_weight must have fc1_weight's shape {tuple(fc1_weight.shape)}, "
                         f"got {tuple(gate_weight.shape)}")
    return _mixture(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B,
                    scale, activation, atomic, gate_weight, gate_bias, gate_A, gate_B)

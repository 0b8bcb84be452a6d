"""Checks of the compiled extension's ops shared by the CPU and CUDA tests (device as a parameter)."""

from __future__ import annotations

import pytest
import torch

from dasam3.layers import DAMoE
from dasam3_kernels import load_backend

from .cases import FROZEN, LORA, Case, assert_close, check_against_reference, make_problem, tolerance
from .test_gated import GATE, GATE_LORA, GatedProblem, check_gated

# Shapes that span several token tiles of the CPU kernel (2^19 / d_ff = 127 rows each), so several threads
# and their gradient accumulators, and several feature tiles of the CUDA kernel with a ragged tail
# (the conformance edge cases all fit in one tile).
MULTI_TILE_CASES = [
    Case(tokens=150, d_model=12, d_ff=4099, rank=3),
    Case(tokens=150, d_model=12, d_ff=4099, experts=6, top_k=3, activation="silu", skew=True),
    Case(tokens=150, d_model=12, d_ff=4099, adapt=("fc2",), bias=False, activation="relu"),
    Case(tokens=150, d_model=12, d_ff=4099, dtype=torch.bfloat16, activation="gelu_tanh"),
]
# E·r = 104: the CUDA backward's factor-gradient accumulators (2 or 3 of [E·r, 64] floats) outgrow 48 KiB of
# shared memory, plain and gated, and go to global memory.
GLOBAL_ACCUMULATOR_CASE = Case(tokens=70, d_model=12, d_ff=130, experts=8, top_k=2, rank=13)
gated_or_plain = pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])


def _detached(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def _op_inputs(case: Case, device: str, gated: bool):
    """(the plain op's arguments up to activation, the gate's four or ()) for `case`."""
    problem = make_problem(case, device)
    if not gated:
        return problem, problem.args(), ()
    problem = GatedProblem(case, device=device)
    t = problem.tensors
    args = (problem.x, problem.indices, problem.weights, *(t[n] for n in FROZEN + LORA), case.scale, case.activation)
    return problem, args, tuple(t[n] for n in GATE + GATE_LORA)


def fwd_args(case: Case, device: str, save: bool, gated: bool = False) -> tuple:
    """Arguments of `dasam3::lowrank_moe_fwd` for `case` (gated: with a gate, adapted); without `save`
    (inference) nothing requires grad."""
    _, args, gate = _op_inputs(case, device, gated)
    if not save:
        args, gate = tuple(map(_detached, args)), tuple(map(_detached, gate))
    return (*args, save, *gate)


def bwd_args(case: Case, device: str, need_fc: bool, gated: bool = False) -> tuple:
    """Arguments of `dasam3::lowrank_moe_bwd`, from a forward that saved its intermediates."""
    problem, args, gate = _op_inputs(case, device, gated)
    t = problem.tensors
    with torch.no_grad():
        y, pre, U, V = torch.ops.dasam3.lowrank_moe_fwd(*args, True, *gate)
    gate_bwd = (t["gate_weight"], *(_detached(t[n]) for n in GATE_LORA)) if gated else ()
    return (torch.randn_like(y), problem.x.detach(), problem.indices, problem.weights.detach(), t["fc1_weight"],
            t["fc2_weight"], t["fc2_bias"], *(_detached(t[n]) for n in LORA), pre, U, V,
            case.scale, case.activation, True, need_fc, *gate_bwd)


def make_layers(device: str, dtype: torch.dtype = torch.float32, backend: str = "cpu", *, skew: bool = False,
                seed: int = 0, **config) -> tuple[DAMoE, DAMoE]:
    """(layer on `backend`, the same layer on "reference"), with every lora factor non-zero.

    The reference runs in fp32 for a half-precision layer (the oracle of SPEC section 2), on the
    same values.  skew: the router prefers expert 1 for every token, so its first slot sees nearly all.
    """
    torch.manual_seed(seed)
    layer = DAMoE(backend=backend, device=device, dtype=dtype, **config)
    with torch.no_grad():
        for param in layer.expert_parameters():
            param.normal_(0.0, 0.3)
        if skew:
            layer.router.token_proj.bias[1] = 5.0
    reference = DAMoE(backend="reference", device=device, dtype=oracle_dtype(dtype), **config)
    reference.load_state_dict(layer.state_dict())
    return layer, reference


def oracle_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def run_layer(layer: DAMoE, x: torch.Tensor, context: torch.Tensor | None, grad_y: torch.Tensor):
    """(y, {name: gradient} for x, context and every trainable parameter) of one forward/backward,
    with the inputs in the layer's dtype."""
    dtype = layer.fc1.weight.dtype
    x, grad_y = x.detach().to(dtype).requires_grad_(), grad_y.to(dtype)
    context = None if context is None else context.detach().to(dtype).requires_grad_()
    y = layer(x, context)
    y.backward(grad_y)
    grads = {"x": x.grad, **({"context": context.grad} if context is not None else {})}
    grads.update({name: p.grad for name, p in layer.named_parameters() if p.requires_grad})
    return y, grads


def check_layer_against_reference(device: str, dtype: torch.dtype = torch.float32, backend: str = "cpu", *,
                                  skew: bool = False, context_dim: int = 0, **config) -> None:
    """DAMoE on `backend` vs "reference": output and the gradients of x, context and all trainables."""
    layer, reference = make_layers(device, dtype, backend, skew=skew, context_dim=context_dim, **config)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, layer.d_model, generator=gen).to(device, dtype)
    context = torch.randn(3, context_dim, generator=gen).to(device, dtype) if context_dim else None
    grad_y = torch.randn(x.shape, generator=gen).to(device, dtype)
    y, grads = run_layer(layer, x, context, grad_y)
    y_ref, grads_ref = run_layer(reference, x, context, grad_y)
    assert torch.equal(layer.last_routing["indices"], reference.last_routing["indices"])
    tol = tolerance(dtype)
    assert_close(y, y_ref, tol, "layer output")
    assert grads.keys() == grads_ref.keys()
    for name, grad_ref in grads_ref.items():
        assert_close(grads[name], grad_ref, tol, f"d{name}")
    assert grads["router.token_proj.weight"].abs().max() > 0  # the routing weights' gradient reached the router


def check_op_against_reference(case: Case, gated: bool, device: str = "cpu") -> None:
    """The compiled op on `device` ("cpu" or "cuda"; gated: `gated_moe`, its gate adapted) vs the
    per-expert reference: output and every gradient."""
    backend = load_backend(device)
    if gated:
        check_gated(backend.gated_moe, case, device=device)
    else:
        check_against_reference(backend.lowrank_moe, case, device=device)


def op_and_args(case: Case, gated: bool) -> tuple:
    """(backend "cpu"'s op, its arguments for `case`)."""
    backend = load_backend("cpu")
    if gated:
        return backend.gated_moe, GatedProblem(case).args()
    return backend.lowrank_moe, make_problem(case, "cpu").args()

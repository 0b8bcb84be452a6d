"""Gated experts (SwiGLU / GeGLU), the quick_gelu activation in every backend, and the torch path's
isolation of a non-finite token: each against the per-expert reference loop or a float64 gradcheck."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from dasam3_kernels import available_backends, gated_moe_reference, load_backend, lowrank_moe_reference
from dasam3_kernels.activations import activation_and_grad, activation_fn

from .cases import DEVICE, EDGE_CASES, LOW_PRECISION_CASES, LORA, Case, assert_close, check_against_reference, \
    make_problem, tolerance

GATED_BACKENDS = [n for n in available_backends(DEVICE) if load_backend(n).gated_moe is not None and n != "reference"]
FAST_BACKENDS = [name for name in available_backends(DEVICE) if name != "reference"]
GATE = ("gate_weight", "gate_bias")
GATE_LORA = ("gate_A", "gate_B")


class GatedProblem:
    """A `cases.Problem` plus the gate's frozen weights and lora factors (adapted when "fc1" is)."""

    def __init__(self, case: Case, seed: int = 0, adapt_gate: bool = True, device: str = DEVICE):
        base = make_problem(case, device, seed=seed)
        gen = torch.Generator().manual_seed(seed + 100)
        T, D, F_, E, r = case.tokens, case.d_model, case.d_ff, case.experts, case.rank

        def rand(*shape, std=1.0, grad=False):
            return (torch.randn(*shape, generator=gen) * std).to(device, case.dtype).requires_grad_(grad)

        self.case, self.x, self.indices, self.weights = case, base.x, base.indices, base.weights
        self.tensors = dict(base.tensors)
        self.tensors["gate_weight"] = rand(F_, D, std=D**-0.5)
        self.tensors["gate_bias"] = rand(F_, std=0.1) if case.bias else None
        self.tensors["gate_A"] = rand(E, r, D, std=D**-0.5, grad=True) if adapt_gate else None
        self.tensors["gate_B"] = rand(E, F_, r, std=r**-0.5, grad=True) if adapt_gate else None

    def args(self) -> tuple:
        names = GATE + ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias") + GATE_LORA + LORA
        return (self.x, self.indices, self.weights, *(self.tensors[n] for n in names), self.case.scale,
                self.case.activation)

    def differentiable(self) -> dict[str, torch.Tensor]:
        named = {"x": self.x, "weights": self.weights, **{n: self.tensors[n] for n in GATE_LORA + LORA}}
        return {n: t for n, t in named.items() if t is not None}

    def cast(self, dtype: torch.dtype) -> "GatedProblem":
        other = object.__new__(GatedProblem)
        convert = lambda t: None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)  # noqa: E731
        other.case, other.indices = replace(self.case, dtype=dtype), self.indices
        other.x, other.weights = convert(self.x), self.weights.detach().clone().requires_grad_()
        other.tensors = {n: convert(t) for n, t in self.tensors.items()}
        return other


def _run(op, problem, grad_out=None):
    y = op(*problem.args())
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    inputs = problem.differentiable()
    if y.numel() == 0:
        return y, grad_out, {n: torch.zeros_like(t) for n, t in inputs.items()}
    grads = torch.autograd.grad(y, list(inputs.values()), grad_out, allow_unused=True)
    return y, grad_out, dict(zip(inputs, grads))


def check_gated(op, case: Case, adapt_gate: bool = True, device: str = DEVICE) -> None:
    problem = GatedProblem(case, adapt_gate=adapt_gate, device=device)
    y, grad_out, grads = _run(op, problem)
    oracle = problem.cast(torch.float32 if case.dtype != torch.float32 else torch.float64)
    y_ref, _, grads_ref = _run(gated_moe_reference, oracle, grad_out.to(oracle.x.dtype))
    tol = tolerance(case.dtype)
    assert y.dtype == case.dtype and y.shape == (case.tokens, case.d_model)
    assert_close(y, y_ref, tol, f"{case}: output")
    assert grads.keys() == grads_ref.keys()
    for name, grad_ref in grads_ref.items():
        assert_close(grads[name], grad_ref, tol, f"{case}: d{name}")


GATED_CASES = EDGE_CASES + [Case(activation="quick_gelu")]


@pytest.mark.parametrize("backend", GATED_BACKENDS)
@pytest.mark.parametrize("case", GATED_CASES + LOW_PRECISION_CASES, ids=str)
def test_gated_moe_matches_reference(backend: str, case: Case):
    check_gated(load_backend(backend).gated_moe, case)


@pytest.mark.parametrize("backend", GATED_BACKENDS)
def test_gated_moe_without_gate_factors(backend: str):
    check_gated(load_backend(backend).gated_moe, Case(activation="silu"), adapt_gate=False)


@pytest.mark.parametrize("backend", ["reference"] + GATED_BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_moe_float64_gradcheck(backend: str, activation: str):
    problem = GatedProblem(Case(tokens=6, d_model=5, d_ff=7, rank=2, activation=activation, dtype=torch.float64))
    for name in ("gate_weight", "fc1_weight", "fc2_bias"):  # the frozen FFN's gradients too
        problem.tensors[name].requires_grad_()
    op = load_backend(backend).gated_moe
    names = [*problem.differentiable(), "gate_weight", "fc1_weight", "fc2_bias"]
    leaves = {**problem.differentiable(), **{n: problem.tensors[n] for n in names[-3:]}}

    def fn(*tensors):
        replaced = dict(zip(names, tensors))
        args = list(problem.args())
        order = ["x", "indices", "weights", *GATE, "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias",
                 *GATE_LORA, *LORA]
        for position, name in enumerate(order):
            if name in replaced:
                args[position] = replaced[name]
        return op(*args)

    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in leaves.values()])


def test_gated_reference_matches_closed_form():
    """E = 1, p = 1: one gated FFN with W + s·B A per projection, written out with explicit matrices."""
    problem = GatedProblem(Case(experts=1, top_k=1, tokens=9, activation="silu"))
    t, s = problem.tensors, problem.case.scale
    merged = {n: t[f"{n}_weight"] + s * t[f"{n}_B"][0] @ t[f"{n}_A"][0] for n in ("gate", "fc1", "fc2")}
    x = problem.x
    h = F.silu(x @ merged["gate"].T + t["gate_bias"]) * (x @ merged["fc1"].T + t["fc1_bias"])
    expected = h @ merged["fc2"].T + t["fc2_bias"]
    assert_close(gated_moe_reference(*problem.args()), problem.weights * expected, 1e-5, "closed form")


# -- quick_gelu -------------------------------------------------------------------------------------


def test_quick_gelu_and_its_derivative():
    z = torch.linspace(-8, 8, 1001, dtype=torch.float64, requires_grad=True)
    expected = z * torch.sigmoid(1.702 * z)
    assert_close(activation_fn("quick_gelu")(z), expected, 1e-12, "quick_gelu")
    h, dh = activation_and_grad("quick_gelu", z)
    (autograd,) = torch.autograd.grad(expected.sum(), z)
    assert_close(h, expected, 1e-12, "value")
    assert_close(dh, autograd, 1e-12, "derivative")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", [Case(activation="quick_gelu"), Case(activation="quick_gelu", tokens=1, bias=False),
                                  Case(activation="quick_gelu", dtype=torch.bfloat16)], ids=str)
def test_quick_gelu_in_every_backend(backend: str, case: Case):
    check_against_reference(load_backend(backend).lowrank_moe, case)


# -- a non-finite token stays with its own experts --------------------------------------------------


def _nan_token_grads(op, problem, bad: int):
    with torch.no_grad():
        problem.x[bad] = float("nan")
    y = op(*problem.args())
    mask = torch.ones_like(y)
    mask[bad] = 0.0  # the token is masked out of the loss
    loss = (torch.where(mask.bool(), y, 0.0) * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    lora = {n: t for n, t in problem.differentiable().items() if n.endswith(("_A", "_B"))}
    return y, dict(zip(lora, torch.autograd.grad(loss, list(lora.values()))))


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_a_nan_token_leaves_other_experts_gradients_finite(gated: bool):
    case = Case(tokens=12, experts=4, top_k=2)
    make = (lambda: GatedProblem(case)) if gated else (lambda: make_problem(case))
    reference_op, torch_op = (gated_moe_reference, load_backend("torch").gated_moe) if gated else \
        (lowrank_moe_reference, load_backend("torch").lowrank_moe)
    bad = 3
    problem = make()
    used = set(problem.indices[bad].tolist())
    assert len(used) == 2
    y_ref, grads_ref = _nan_token_grads(reference_op, make(), bad)
    y, grads = _nan_token_grads(torch_op, problem, bad)
    others = torch.arange(len(y)) != bad
    assert y[bad].isnan().all() and y_ref[bad].isnan().all()
    assert_close(y[others], y_ref[others], 1e-4, "the other tokens' outputs")
    for name, grad_ref in grads_ref.items():
        for expert in range(case.experts):
            if expert in used:  # the reference's NaN reaches the experts the token went to, and only them
                assert not grads[name][expert].isfinite().all(), f"d{name}[{expert}] should be NaN as the reference"
            else:
                assert grads[name][expert].isfinite().all(), f"d{name}[{expert}] caught the other token's NaN"
                assert_close(grads[name][expert], grad_ref[expert], 1e-4, f"d{name}[{expert}]")

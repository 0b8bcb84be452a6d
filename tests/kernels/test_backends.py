"""Every backend that runs on this machine against the reference loop: the SPEC section 2 contract.

New backends join these tests by becoming loadable in `dasam3_kernels.backends`; nothing here
names them.  The reference itself is checked against a float64 gradcheck and a closed form.
"""

from __future__ import annotations

import pytest
import torch

from dasam3_kernels import available_backends, backends, load_backend, lowrank_moe_reference, routing

from .cases import (DEVICE, EDGE_CASES, HALF_EDGE_CASES, LOW_PRECISION_CASES, Case, assert_close,
                    check_against_reference, make_problem)

FAST_BACKENDS = [name for name in available_backends(DEVICE) if name != "reference"]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("case", EDGE_CASES + LOW_PRECISION_CASES + HALF_EDGE_CASES, ids=str)
def test_lowrank_moe_matches_reference(backend: str, case: Case):
    check_against_reference(load_backend(backend).lowrank_moe, case)


@pytest.mark.parametrize("backend", ["reference"] + FAST_BACKENDS)
def test_lowrank_moe_float64_gradcheck(backend: str):
    problem = make_problem(Case(tokens=6, d_model=5, d_ff=7, rank=2, dtype=torch.float64))
    op = load_backend(backend).lowrank_moe
    names = list(problem.differentiable())

    def fn(*tensors):
        return op(*problem.with_differentiable(dict(zip(names, tensors))).args())

    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in problem.differentiable().values()])


def test_reference_matches_closed_form():
    """With E = 1 and p = 1 the mixture is one FFN with W + s·B A: compare with explicit matrices."""
    problem = make_problem(Case(experts=1, top_k=1, tokens=9))
    t = problem.tensors
    s = problem.case.scale
    w1 = t["fc1_weight"] + s * t["fc1_B"][0] @ t["fc1_A"][0]
    w2 = t["fc2_weight"] + s * t["fc2_B"][0] @ t["fc2_A"][0]
    expected = torch.nn.functional.gelu(problem.x @ w1.T + t["fc1_bias"]) @ w2.T + t["fc2_bias"]
    y = lowrank_moe_reference(*problem.args())
    assert_close(y, problem.weights * expected, 1e-5, "closed form")


@pytest.mark.parametrize("backend", sorted(set(FAST_BACKENDS) | {"reference"}))
@pytest.mark.parametrize("context_rows", [0, 3, 12], ids=["no-context", "per-sample", "per-token"])
def test_route_matches_torch(backend: str, context_rows: int):
    """The (possibly fused) router against `routing.route`: same experts, weights, probs, gradients."""
    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE).requires_grad_()  # noqa: E731
    x, weight, bias = rand(12, 10), rand(5, 10), rand(5)
    ctx = rand(context_rows, 5) if context_rows else None
    leaves = [t for t in (x, weight, bias, ctx) if t is not None]

    def run(fn):
        indices, weights, probs = fn(x, weight, bias, ctx, 2)
        loss = (weights * torch.arange(1.0, 3.0, device=DEVICE)).sum() + \
            (probs.log() * torch.linspace(0, 1, 5, device=DEVICE)).sum()
        return indices, weights, probs, torch.autograd.grad(loss, leaves)

    expected = run(routing.route)
    actual = run(load_backend(backend).route)
    assert torch.equal(actual[0], expected[0])
    for a, e, what in zip(actual[1:3], expected[1:3], ("weights", "probs")):
        assert_close(a, e, 1e-5, what)
    for a, e in zip(actual[3], expected[3]):
        assert_close(a, e, 1e-4, "router gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_auto_order_on_cpu_is_a_full_ranking_per_dtype(dtype: torch.dtype):
    """Every CPU dtype ranks real backends and ends in torch, which serves every call; resolving
    `auto` takes the first of them that loads."""
    order = backends.auto_order("cpu", dtype)
    assert order[-1] == "torch" and set(order) <= set(backends.BACKENDS) - {"auto"}
    first_loadable = next(name for name in order if name in available_backends("cpu"))
    assert backends.resolve_backend("auto", torch.device("cpu"), dtype=dtype).name == first_loadable

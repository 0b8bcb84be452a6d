"""The fused Triton router against `routing.route` (the fp32 PyTorch oracle): experts, weights, probs and
the gradients to x, token_proj, its bias and the per-sample context bias."""

from __future__ import annotations

import pytest
import torch

from dasam3_kernels import available_backends, load_backend, routing

from .cases import DEVICE, assert_close

pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="needs the triton backend")
route = load_backend("triton").route if "triton" in available_backends(DEVICE) else None


def _router_inputs(tokens: int, width: int, experts: int, context_rows: int, dtype=torch.float32, skew=False):
    gen = torch.Generator().manual_seed(11)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(device=DEVICE, dtype=dtype).requires_grad_()

    x = rand(tokens, width)
    weight = rand(experts, width, std=width**-0.5)
    bias = torch.randn(experts, generator=gen)
    if skew:  # every token's first choice is the same expert
        bias[experts // 2] += 100.0
    bias = bias.to(device=DEVICE, dtype=dtype).requires_grad_()
    ctx_bias = rand(context_rows, experts).float() if context_rows else None
    if ctx_bias is not None:
        ctx_bias = ctx_bias.detach().requires_grad_()
    return x, weight, bias, ctx_bias


def _routed(fn, x, weight, bias, ctx_bias, top_k):
    """Outputs and gradients of a loss that weighs every output differently."""
    indices, weights, probs = fn(x, weight, bias, ctx_bias, top_k)
    gen = torch.Generator().manual_seed(5)
    loss = (weights * torch.randn(weights.shape, generator=gen).to(weights)).sum() + \
        (probs * torch.randn(probs.shape, generator=gen).to(probs)).sum()
    leaves = [t for t in (x, weight, bias, ctx_bias) if t is not None]
    if not x.shape[0]:
        return indices, weights, probs, [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(loss, leaves)
    return indices, weights, probs, grads


ROUTER_CASES = {
    # tokens, width, experts, top_k, context rows: several token tiles and K-steps (blocks are 128 in the
    # interpreter), per-sample context, k = E, one expert, eight experts.
    "multi-tile,per-sample": (300, 150, 4, 2, 3),
    "per-token": (37, 24, 5, 3, 37),
    "k=E": (19, 16, 6, 6, 1),
    "one-expert": (8, 16, 1, 1, 0),
    "eight-experts": (45, 40, 8, 3, 5),
    "single-token": (1, 16, 4, 2, 1),
    "no-tokens": (0, 16, 4, 2, 0),
}


@pytest.mark.parametrize("shape", ROUTER_CASES.values(), ids=ROUTER_CASES.keys())
@pytest.mark.parametrize("skew", [False, True], ids=["spread", "skew"])
def test_router_matches_routing(shape, skew: bool):
    tokens, width, experts, top_k, rows = shape
    inputs = _router_inputs(tokens, width, experts, rows, skew=skew)
    expected = _routed(routing.route, *inputs, top_k)
    actual = _routed(route, *inputs, top_k)
    assert actual[0].dtype == torch.int64 and actual[1].dtype == actual[2].dtype == torch.float32
    assert torch.equal(actual[0], expected[0])
    if skew and tokens:
        assert (actual[0][:, 0] == experts // 2).all()
    for name, a, e in zip(("weights", "probs"), actual[1:3], expected[1:3]):
        assert_close(a, e, 1e-5, name)
    for name, a, e in zip(("x", "weight", "bias", "context bias"), actual[3], expected[3]):
        assert_close(a, e, 1e-4, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_low_precision_input_routes_in_fp32(dtype):
    inputs = _router_inputs(40, 32, 4, 4, dtype=dtype)
    expected = _routed(routing.route, *inputs, 2)
    actual = _routed(route, *inputs, 2)
    assert torch.equal(actual[0], expected[0])
    assert_close(actual[1], expected[1], 1e-5, "weights")
    for name, a, e in zip(("x", "weight", "bias", "context bias"), actual[3], expected[3]):
        assert a.dtype == e.dtype, name
        assert_close(a, e, 2e-2, f"d{name}")


def test_router_ties_pick_the_lower_expert_first():
    """torch.topk leaves the order of equal logits unspecified; the kernel takes the lower index first."""
    x = torch.zeros(3, 16, device=DEVICE)
    weight = torch.zeros(5, 16, device=DEVICE)
    bias = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0], device=DEVICE)
    indices, weights, probs = route(x, weight, bias, None, 3)
    assert indices.tolist() == [[1, 2, 4]] * 3
    assert_close(weights, torch.full_like(weights, 1 / 3), 1e-6, "tied weights")
    assert_close(probs, routing.route(x, weight, bias, None, 3)[2], 1e-6, "probs")


def test_router_rejects_bad_arguments():
    x, weight = torch.zeros(6, 16, device=DEVICE), torch.zeros(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="divide the number of tokens 6, got 4"):
        route(x, weight, None, torch.zeros(4, 4, device=DEVICE), 2)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\], got 5"):
        route(x, weight, None, None, 5)


def test_router_nan_logit_is_picked_as_torch_picks_it():
    """A NaN logit ranks above every number (torch.topk); the kernel once stored index E_PAD for it,
    which the expert kernels then dropped silently.  Now it picks the NaN expert and the weights are NaN."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 16, generator=gen).to(DEVICE)
    weight = torch.randn(4, 16, generator=gen).to(DEVICE)
    bias = torch.tensor([0.0, float("nan"), 0.5, -0.5], device=DEVICE)
    indices, weights, probs = route(x, weight, bias, None, 2)
    indices_ref, weights_ref, probs_ref = routing.route(x, weight, bias, None, 2)
    assert indices.min() >= 0 and indices.max() < 4
    assert torch.equal(indices[:, 0], indices_ref[:, 0]) and (indices[:, 0] == 1).all()
    assert torch.equal(indices[:, 1], indices_ref[:, 1])
    assert weights.isnan().all() and weights_ref.isnan().all()
    assert probs.isnan().all() and probs_ref.isnan().all()

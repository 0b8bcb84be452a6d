"""The Triton backend's custom ops: opcheck, torch.compile without graph breaks, the reduction flag,
multi-tile shapes, unfrozen FFN weights, and the layer end to end against the reference backend; each
for plain and gated (SwiGLU/GeGLU) FFNs."""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from dasam3.layers import DAMoE
from dasam3_kernels import available_backends, gated_moe_reference, load_backend, lowrank_moe_reference

from .cases import DEVICE, FROZEN, LORA, Case, assert_close, check_against_reference, forward_backward, make_problem
from .test_gated import GATE, GATE_LORA, GatedProblem, check_gated

pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="needs the triton backend")
if "triton" in available_backends(DEVICE):
    from dasam3_kernels import triton_ops

# Several tiles along every dimension of every kernel (the interpreter's blocks are 64 tokens,
# 128 features and 128 of the inner dimension), an odd stacked rank (E·r = 15, padded to 16).
MULTI_TILE = Case(tokens=150, d_model=200, d_ff=300, experts=3, top_k=2, rank=5)
FFNS = pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])


def _problem(case: Case, gated: bool):
    return GatedProblem(case) if gated else make_problem(case)


def _op(gated: bool, **options):
    """The backend's public op for the layer kind (its arguments as `_problem(...).args()`)."""
    op = triton_ops.gated_moe if gated else triton_ops.lowrank_moe
    return lambda *args: op(*args, **options)


@FFNS
def test_multi_tile_matches_reference(gated: bool):
    if gated:
        check_gated(load_backend("triton").gated_moe, MULTI_TILE)
    else:
        check_against_reference(load_backend("triton").lowrank_moe, MULTI_TILE)


@FFNS
@pytest.mark.parametrize("bad", [-1, 4], ids=["negative", "past-the-experts"])
def test_out_of_range_expert_index_raises(bad: int, gated: bool):
    """An index outside [0, E) matches no expert's columns in the kernels: an error, never a silent drop."""
    problem = _problem(Case(tokens=5), gated)
    problem.indices[2, 1] = bad
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, 4\), got values in \[{min(bad, 0)}, {max(bad, 3)}\]"):
        _op(gated)(*problem.args())


@FFNS
@pytest.mark.parametrize("case", [MULTI_TILE, replace(MULTI_TILE, adapt=("fc1",), bias=False, activation="silu")],
                         ids=["both", "fc1-only"])
def test_atomic_reductions_match_deterministic(case: Case, gated: bool):
    problem = _problem(case, gated)
    runs = {}
    for atomic in (False, True, False):
        runs.setdefault(atomic, []).append(forward_backward(_op(gated, atomic=atomic), problem))
    (y0, _, g0), (y1, _, g1) = runs[False]
    assert torch.equal(y0, y1) and all(torch.equal(g0[n], g1[n]) for n in g0), "deterministic mode must be bitwise"
    y_atomic, _, g_atomic = runs[True][0]
    assert_close(y_atomic, y0, 1e-5, "atomic output")
    for name in g0:
        assert_close(g_atomic[name], g0[name], 1e-5, f"atomic d{name}")


@FFNS
def test_unfrozen_ffn_weights_get_reference_gradients(gated: bool):
    """The fused path trains the lora factors; should someone unfreeze W0 (and the gate), its gradients
    still match."""
    problem = _problem(Case(tokens=21), gated)
    names = FROZEN + (GATE if gated else ())
    for name in names:
        problem.tensors[name].requires_grad_()
    frozen = [problem.tensors[n] for n in names]
    y = _op(gated)(*problem.args())
    oracle = problem.cast(torch.float64)
    y_ref = (gated_moe_reference if gated else lowrank_moe_reference)(*oracle.args())
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    grads = torch.autograd.grad(y, frozen, grad_out)
    grads_ref = torch.autograd.grad(y_ref, [oracle.tensors[n] for n in names], grad_out.double())
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, 1e-4, f"d{name}")


def _op_args(case: Case, gated: bool) -> tuple:
    """The forward custom op's arguments: the plain layer's, then the gate's when gated."""
    problem = _problem(case, gated)
    gate = [problem.tensors[n] for n in GATE + GATE_LORA] if gated else []
    return (problem.x, problem.indices, problem.weights, *(problem.tensors[n] for n in FROZEN + LORA), case.scale,
            case.activation, False, *gate)


@FFNS
@pytest.mark.parametrize("case", [Case(tokens=7, d_model=8, d_ff=20), Case(tokens=5, adapt=("fc2",), bias=False)],
                         ids=["both", "fc2-only-no-bias"])
def test_opcheck_lowrank_moe(case: Case, gated: bool):
    args = _op_args(case, gated)
    torch.library.opcheck(torch.ops.dasam3.triton_lowrank_moe.default, args)
    grad_y = torch.randn(case.tokens, case.d_model, device=DEVICE)
    _, mixed, lora_mid = torch.ops.dasam3.triton_lowrank_moe(*args)
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    backward_args = (grad_y, *detached[:11], lora_mid, case.scale, case.activation, False, True, *detached[14:])
    torch.library.opcheck(torch.ops.dasam3.triton_lowrank_moe_backward.default, backward_args)


def test_opcheck_route():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias, ctx = (torch.randn(*s, generator=gen).to(DEVICE).requires_grad_()
                            for s in ((12, 10), (5, 10), (5,), (3, 5)))
    torch.library.opcheck(torch.ops.dasam3.triton_route.default, (x, weight, bias, ctx, 2))
    weights, probs, indices = torch.ops.dasam3.triton_route(x, weight, bias, ctx, 2)
    grads = (torch.randn(weights.shape, generator=gen).to(DEVICE), torch.randn(probs.shape, generator=gen).to(DEVICE))
    torch.library.opcheck(torch.ops.dasam3.triton_route_backward.default,
                          (*grads, x.detach(), weight.detach(), indices, weights.detach(), probs.detach()))


def _layer(backend: str, **kwargs) -> DAMoE:
    """A small layer (gated=True: a gated FFN, every projection adapted) with non-zero lora factors."""
    torch.manual_seed(0)
    layer = DAMoE(16, 40, num_experts=4, top_k=2, rank=4, context_dim=6, backend=backend, **kwargs).to(DEVICE)
    with torch.no_grad():  # non-zero B factors: the zero init would hide their gradient paths
        for param in layer.expert_parameters():
            param.normal_(std=0.3)
    return layer.train()


def _layer_step(layer: DAMoE, x: torch.Tensor, context: torch.Tensor):
    """Output, aux losses and the gradients of every trainable parameter, x and the context."""
    x, context = x.detach().requires_grad_(), context.detach().requires_grad_()
    y = layer(x, context)
    loss = (y * torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)).sum() + \
        layer.aux["balance"] + layer.aux["sparse"]
    params = {n.removeprefix("_orig_mod."): p for n, p in layer.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, [x, context, *params.values()])
    return y, dict(layer.aux), dict(zip(["x", "context", *params], grads))


# Gated in fp32 only: under bf16 autocast the reference backend rounds too, and its gated layer's router
# bias gradient differs from the torch backend's by 5% of its scale (cancellation in a sum over tokens):
# the gated kernels' half precision is checked against the fp32 reference in test_gated.py instead.
@pytest.mark.parametrize("dtype, gated", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)],
                         ids=["fp32", "bf16-autocast", "fp32-gated"])
def test_layer_matches_reference_backend(dtype, gated: bool):
    """DAMoE(backend="triton") against DAMoE(backend="reference"): forward, aux losses, every gradient
    (x, context, lora factors, router token and context projections)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 16, generator=gen).to(DEVICE)
    context = torch.randn(3, 6, generator=gen).to(DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        with torch.autocast(torch.device(DEVICE).type, dtype=dtype, enabled=dtype != torch.float32):
            results[backend] = _layer_step(_layer(backend, gated=gated), x, context)
    (y, aux, grads), (y_ref, aux_ref, grads_ref) = results["triton"], results["reference"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_close(y, y_ref, tol, "output")
    for name in aux_ref:
        assert_close(aux[name], aux_ref[name], 1e-5, name)
    assert {"router.token_proj.weight", "router.context_proj.weight", "fc1_lora_A", "fc2_lora_B"} <= set(grads)
    assert not gated or {"gate_lora_A", "gate_lora_B"} <= set(grads)
    for name, grad_ref in grads_ref.items():
        assert_close(grads[name], grad_ref, tol, f"d{name}")


@FFNS
def test_layer_compiles_fullgraph_with_the_fused_ops(gated: bool):
    """torch.compile(fullgraph=True) traces the layer (aot_eager: inductor's C++ build is too slow for
    CI); the fused ops appear in the forward and backward graphs and the results match eager."""
    seen = {"forward": set(), "backward": set()}

    def recorder(kind):
        def compile_graph(gm, _example_inputs):
            seen[kind] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compile_graph

    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    gen = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 5, 16, generator=gen).to(DEVICE), torch.randn(2, 6, generator=gen).to(DEVICE)
    layer = _layer("triton", gated=gated)
    y_eager, _, grads_eager = _layer_step(layer, x, context)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    y, _, grads = _layer_step(compiled, x, context)

    assert {"dasam3.triton_route.default", "dasam3.triton_lowrank_moe.default"} <= seen["forward"]
    assert {"dasam3.triton_route_backward.default", "dasam3.triton_lowrank_moe_backward.default"} <= seen["backward"]
    assert_close(y, y_eager, 1e-6, "compiled output")
    for name, grad in grads_eager.items():
        assert_close(grads[name], grad, 1e-6, f"compiled d{name}")


def test_device_error_says_what_is_missing(monkeypatch):
    from dasam3_kernels import triton_common

    assert triton_ops.device_error(torch.device("cuda")) is None
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    assert "TRITON_INTERPRET=1" in triton_ops.device_error(torch.device("cpu"))
    assert "CUDA device" in triton_ops.device_error(torch.device("meta"))


def test_missing_triton_is_a_runtime_error_saying_how_to_get_it(monkeypatch):
    import dasam3_kernels
    from dasam3_kernels import backends

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails as if not installed
    for name in [m for m in sys.modules if m.startswith("dasam3_kernels.triton_")]:
        monkeypatch.delitem(sys.modules, name)
        monkeypatch.delattr(dasam3_kernels, name.rsplit(".", 1)[1], raising=False)
    with pytest.raises(RuntimeError, match=r"backend 'triton' is not available.*pip install 'dasam3\[triton\]'"):
        backends._load_triton()

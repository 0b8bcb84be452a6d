"""The compiled CUDA kernels (csrc/damoe_cuda.cu, backend "cuda") against the reference, on a GPU.

Skipped without a CUDA device.  On a GPU machine the extension must be built (`DASAM3_BUILD_CUDA=1
pip install -e . --no-build-isolation`): a missing build fails these tests rather than skipping them.
"""

from __future__ import annotations

import pytest
import torch

from dasam3_kernels import available_backends, load_backend

from .cases import EDGE_CASES, LOW_PRECISION_CASES, Case, assert_close, check_against_reference, make_problem
from .ext_checks import GLOBAL_ACCUMULATOR_CASE, MULTI_TILE_CASES, bwd_args, check_layer_against_reference, \
    check_op_against_reference, fwd_args, gated_or_plain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# SAM3's fusion-encoder FFN (x [4, 1024, 256], F = 2048, E = 4, k = 2, r = 8) in every dtype.
SAM3_CASES = [Case(tokens=4096, d_model=256, d_ff=2048, experts=4, top_k=2, rank=8, dtype=dtype, scale=1.0)
              for dtype in (torch.float32, torch.float16, torch.bfloat16)]
# Several token and feature tiles and GEMM K-steps (d_model = 70 = 2 x 32 + 6), ragged everywhere.
RAGGED_TILE_CASES = [
    Case(tokens=131, d_model=70, d_ff=200, rank=8),
    Case(tokens=131, d_model=70, d_ff=200, adapt=("fc1",)),
    *(Case(tokens=131, d_model=70, d_ff=200, dtype=dtype, activation=activation)
      for dtype in (torch.float16, torch.bfloat16) for activation in ("gelu", "silu")),
]
CUDA_CASES = EDGE_CASES + LOW_PRECISION_CASES + MULTI_TILE_CASES + RAGGED_TILE_CASES + SAM3_CASES + \
    [GLOBAL_ACCUMULATOR_CASE]
# Gated (test_gated.py runs the edge cases on the GPU too, under DASAM3_TEST_DEVICE=cuda): several tiles,
# the accumulators in global memory, and a LLaMA-like width in every dtype.
LLAMA_LIKE_CASES = [Case(tokens=700, d_model=256, d_ff=704, experts=4, top_k=2, rank=8, activation="silu",
                         dtype=dtype, scale=1.0) for dtype in (torch.float32, torch.float16, torch.bfloat16)]
GATED_CUDA_CASES = MULTI_TILE_CASES + RAGGED_TILE_CASES + [GLOBAL_ACCUMULATOR_CASE] + LLAMA_LIKE_CASES


@pytest.fixture(scope="module")
def cuda_op():
    return load_backend("cuda").lowrank_moe  # RuntimeError (not a skip) when the extension is not built


def test_backend_is_listed_for_cuda_devices(cuda_op):
    assert "cuda" in available_backends("cuda")


@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_matches_reference(cuda_op, case: Case):
    check_against_reference(cuda_op, case, device="cuda")


@pytest.mark.parametrize("case", GATED_CUDA_CASES, ids=str)
def test_gated_matches_reference(cuda_op, case: Case):
    check_op_against_reference(case, gated=True, device="cuda")


def test_float64_gradcheck(cuda_op):
    problem = make_problem(Case(tokens=6, d_model=5, d_ff=7, rank=2, dtype=torch.float64), device="cuda")
    names = list(problem.differentiable())

    def fn(*tensors):
        return cuda_op(*problem.with_differentiable(dict(zip(names, tensors))).args())

    assert torch.autograd.gradcheck(fn, [t.detach().requires_grad_() for t in problem.differentiable().values()])


@gated_or_plain
@pytest.mark.parametrize("case", [Case(), Case(adapt=("fc1",), bias=False), Case(dtype=torch.bfloat16)], ids=str)
def test_op_contracts(cuda_op, case: Case, gated: bool):
    torch.library.opcheck(torch.ops.dasam3.lowrank_moe_fwd.default, fwd_args(case, "cuda", True, gated))
    torch.library.opcheck(torch.ops.dasam3.lowrank_moe_fwd.default, fwd_args(case, "cuda", False, gated))
    torch.library.opcheck(torch.ops.dasam3.lowrank_moe_bwd.default, bwd_args(case, "cuda", True, gated))


@gated_or_plain
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("config", [{"skew": True}, {"context_dim": 6, "activation": "relu"}],
                         ids=["skewed", "context"])
def test_layer_matches_reference(cuda_op, dtype: torch.dtype, config: dict, gated: bool):
    check_layer_against_reference("cuda", dtype, "cuda", d_model=24, d_ff=72, gated=gated, **config)


def test_deterministic_mode_is_refused(cuda_op):
    """The CUDA kernels sum with atomics: under torch.use_deterministic_algorithms they say so."""
    problem = make_problem(Case(), device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="lowrank_moe_fwd"):
            cuda_op(*problem.args())
    finally:
        torch.use_deterministic_algorithms(previous)


def _no_host_sync(fn):
    """Runs fn() with torch's sync debug mode set to raise on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_forward_and_backward_never_sync_the_host(cuda_op):
    """The index check runs on the device (it read the index range back to the host on every call)."""
    problem = make_problem(Case(tokens=300, d_model=64, d_ff=256, dtype=torch.bfloat16), device="cuda")
    grad = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
    y = _no_host_sync(lambda: cuda_op(*problem.args()))
    _no_host_sync(lambda: torch.autograd.grad(y, [problem.x, problem.tensors["fc1_A"]], grad))


def test_forward_is_captured_by_a_cuda_graph(cuda_op):
    problem = make_problem(Case(tokens=300, d_model=64, d_ff=256, dtype=torch.bfloat16), device="cuda")
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in problem.args())
    with torch.no_grad():
        expected = cuda_op(*args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            cuda_op(*args)  # warm-up outside the capture, as CUDA graphs require
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = cuda_op(*args)
        graph.replay()
    torch.cuda.synchronize()
    assert_close(captured, expected, 2e-2, "replayed graph")  # V's atomics: equal up to summation order

"""The CUDA backend's kernels (csrc/damoe_cuda_kernels.cuh, plain and gated) against the per-expert
reference on an emulated GPU (`emulated_cuda`: the same source compiled as host code, a thread per CUDA
thread), so CI tests their indexing, warp sums, shared-memory accumulators and gated math without a GPU.
The real GPU runs test_cuda_ops.py (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch

from dasam3_kernels import gated_moe_reference, lowrank_moe_reference

from . import emulated_cuda
from .cases import EDGE_CASES, Case, assert_close, check_against_reference, make_problem
from .ext_checks import GLOBAL_ACCUMULATOR_CASE, gated_or_plain
from .test_gated import GATE, GatedProblem, check_gated

pytestmark = pytest.mark.skipif(emulated_cuda.compiler_missing() is not None,
                                reason=str(emulated_cuda.compiler_missing()))

# Beyond the edge cases (one block each): several token and feature blocks with ragged tails, and the
# factor-gradient accumulators in global memory.
TILED_CASES = [
    Case(tokens=131, d_model=10, d_ff=150, rank=3),
    Case(tokens=131, d_model=10, d_ff=150, experts=6, top_k=3, activation="silu", skew=True),
]
CASES = EDGE_CASES + [Case(activation="quick_gelu")] + TILED_CASES + [GLOBAL_ACCUMULATOR_CASE]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_plain_kernels_match_reference(case: Case):
    check_against_reference(emulated_cuda.lowrank_moe, case, device="cpu")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gated_kernels_match_reference(case: Case):
    check_gated(emulated_cuda.gated_moe, case, device="cpu")


def test_gated_kernels_without_gate_factors():
    check_gated(emulated_cuda.gated_moe, Case(activation="silu"), adapt_gate=False, device="cpu")


def test_global_accumulator_case_leaves_shared_memory():
    """The E·r = 104 case really takes the global-memory path (else it would test nothing new)."""
    case = GLOBAL_ACCUMULATOR_CASE
    for adapted in (2, 3):  # plain: fc1 and fc2; gated: and the gate
        assert adapted * case.experts * case.rank * emulated_cuda.TILE * 4 > emulated_cuda.library().shared_memory_limit()


@gated_or_plain
def test_frozen_weights_get_the_reference_gradients(gated: bool):
    """grad_pre (both halves, gated) and mixed, the kernels' outputs for the frozen weights' gradients."""
    case = Case(tokens=70, d_ff=90)
    problem = GatedProblem(case, device="cpu") if gated else make_problem(case, "cpu")
    frozen = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias") + (GATE if gated else ())
    op, reference = (emulated_cuda.gated_moe, gated_moe_reference) if gated else \
        (emulated_cuda.lowrank_moe, lowrank_moe_reference)
    oracle = problem.cast(torch.float64)
    grads = {}
    for which, run, p in (("emulated", op, problem), ("reference", reference, oracle)):
        leaves = [p.tensors[n].requires_grad_() for n in frozen]
        y = run(*p.args())
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y)
        grads[which] = dict(zip(frozen, torch.autograd.grad(y, leaves, grad_out)))
    for name in frozen:
        assert_close(grads["emulated"][name], grads["reference"][name], 1e-4, f"d{name}")

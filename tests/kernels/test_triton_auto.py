"""backend="auto" on a GPU picks per dtype (the choice is pure logic: it runs without a GPU)."""

from __future__ import annotations

import pytest
import torch

from dasam3_kernels import resolve_backend

pytest.importorskip("triton")
CUDA = torch.device("cuda")


@pytest.fixture
def tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    yield lambda allowed: setattr(torch.backends.cuda.matmul, "allow_tf32", allowed)
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_run_the_fused_triton_kernels(dtype, tf32):
    tf32(False)
    assert resolve_backend("auto", CUDA, dtype=dtype).name == "triton"


def test_fp32_runs_triton_only_on_tf32(tf32):
    """Exact fp32 tl.dot has no tensor cores (and compiled for 35 s, spilling 20 KB): cuBLAS is faster."""
    tf32(False)
    assert resolve_backend("auto", CUDA, dtype=torch.float32).name == "torch"
    tf32(True)
    assert resolve_backend("auto", CUDA, dtype=torch.float32).name == "triton"


def test_fp64_runs_the_torch_path(tf32):
    tf32(True)
    assert resolve_backend("auto", CUDA, dtype=torch.float64).name == "torch"


def test_the_tf32_kernels_follow_torchs_switch(tf32):
    from dasam3_kernels.triton_common import INTERPRET, dot_precision

    tf32(True)
    assert dot_precision(torch.float32) == ("ieee" if INTERPRET else "tf32")
    assert dot_precision(torch.bfloat16) == "ieee" and dot_precision(torch.float64) == "ieee"
    tf32(False)
    assert dot_precision(torch.float32) == "ieee"

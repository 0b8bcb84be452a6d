"""The compiled CUDA library loads alone, with no GPU and without the CPU library (gpu_check.sh builds
only it), and beside the CPU library without a second definition of the ops.  A fresh interpreter
each, since a loaded library stays loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dasam3_kernels import cpp_ops

ROOT = Path(__file__).resolve().parents[2]
needs_library = pytest.mark.skipif(cpp_ops._library_path("_C_cuda") is None,
                                   reason="the CUDA extension is not built (DASAM3_BUILD_CUDA=1; CI builds it)")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


@needs_library
def test_cuda_library_loads_without_the_cpu_library():
    result = _run("""
        import torch
        from dasam3_kernels import cpp_ops
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        cpp_ops.load_cuda()
        assert cpp_ops.cpu_variant.cache_info().currsize == 0, "the CPU library was loaded"
        assert has("dasam3::lowrank_moe_fwd", "CUDA") and has("dasam3::lowrank_moe_bwd", "CUDA")
        assert not has("dasam3::lowrank_moe_fwd", "CPU")
        print(torch.ops.dasam3.lowrank_moe_fwd.default._schema)
        cpp_ops.cpu_variant()  # and the CPU library after it: the ops are defined once, by Python
        assert has("dasam3::lowrank_moe_fwd", "CPU") and has("dasam3::lowrank_moe_fwd", "CUDA")
    """)
    assert result.returncode == 0, result.stderr
    assert "lowrank_moe_fwd(Tensor x, Tensor indices" in result.stdout


@needs_library
def test_cpu_library_first_then_cuda():
    result = _run("""
        import torch
        from dasam3_kernels import backends, cpp_ops
        cpp_ops.cpu_variant()
        cpp_ops.load_cuda()
        assert torch._C._dispatch_has_kernel_for_dispatch_key("dasam3::lowrank_moe_fwd", "CUDA")
        backends.load_backend("cuda")  # loads; runs only where a GPU is (device_error says so)
    """)
    assert result.returncode == 0, result.stderr


def test_missing_cuda_library_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(cpp_ops, "_library_path", lambda stem: None)
    cpp_ops.load_cuda.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"CUDA extension is not built .*DASAM3_BUILD_CUDA=1"):
            cpp_ops.load_cuda()
    finally:
        cpp_ops.load_cuda.cache_clear()

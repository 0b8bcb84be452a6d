"""The Triton backend's measurement scripts: the saved-activation budget (benchmarks/saved_activations.py)
and a CPU smoke run of the GPU benchmark (benchmarks/gpu_check.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dasam3_kernels import available_backends

from .cases import DEVICE

pytestmark = pytest.mark.skipif("triton" not in available_backends(DEVICE), reason="needs the triton backend")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name: str):
    """Import benchmarks/<name>.py (not a package) as a module."""
    module_name = f"benchmarks_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up here
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def test_saved_activations_within_budget_of_dense_ffn():
    """At SAM3's per-token proportions (D = 256, F = 2048, E = 4, k = 2, r = 8; T only scales) the fused
    op saves x, indices, weights and V [T, E·r] fp32 — within 1.25x (about 0.14x) of a dense FFN's [T, F]."""
    T, D, F, E, k, r = 64, 256, 2048, 4, 2, 8
    saved = _script("saved_activations").measure(T, D, F, E, k, r, torch.float32, DEVICE)
    assert saved["dense"].bytes == T * F * 4  # GELU's input
    assert sorted(saved["op"].tensors, key=str) == sorted([
        ((T, D), torch.float32, T * D * 4), ((T, k), torch.int64, T * k * 8), ((T, k), torch.float32, T * k * 4),
        ((T, E * r), torch.float32, T * E * r * 4)], key=str)
    assert saved["op"].bytes <= 1.25 * saved["dense"].bytes
    assert saved["layer"].bytes <= 1.25 * saved["dense"].bytes  # router and aux losses add [T, E]-sized tensors


@pytest.mark.skipif(DEVICE != "cpu", reason="the GPU runs the real benchmark")
def test_gpu_check_script_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "result.json"
    args = ["--device", "cpu", "--tokens", "32", "--d-model", "16", "--d-ff", "32", "--dtype", "fp32",
            "--activations", "relu", "--out", str(out)]
    assert _script("gpu_check").main(args) == 0
    result = json.loads(out.read_text())
    ratios = result["results"]["relu"]["ratios"]["eager"]
    layers = result["results"]["relu"]["layers"]
    assert set(layers) == {"dense", "torch", "standard_moe", "triton", "cuda", "dense_gated", "torch_gated",
                           "triton_gated", "cuda_gated"}
    for name in ("cuda", "cuda_gated"):
        assert "cuda" in layers[name]["skipped"]  # recorded with the reason it cannot run on the CPU
    assert set(result["results"]["relu"]["ops"]) == {"torch", "triton", "cuda"}
    assert all(ratios[name] > 0 for name in ("triton_forward_vs_dense", "triton_train_vs_dense",
                                             "torch_vs_triton_forward", "triton_gated_forward_vs_dense_gated",
                                             "triton_gated_train_vs_dense_gated"))
    assert _script("gpu_check").main(args) == 2, "an existing result must not be overwritten"

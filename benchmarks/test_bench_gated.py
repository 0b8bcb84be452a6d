"""The gated DA-MoE layer at a LLaMA-like FFN shape under pytest-benchmark (see bench_gated.py).

x [2, 512, 1024], F = 2816, silu, E = 4, k = 2, r = 8, fp32 on the CPU: the dense gated FFN ("dense FFN"),
DAMoE's torch path, DAMoE on the fused C++ kernel (skipped when it is not built) and the MixLoRA-style
contender, each checked against the reference before it is timed.
"""

from __future__ import annotations

import pytest
import torch

import bench_gated

NAMES = ["dense FFN", bench_gated.TORCH_PATH, bench_gated.FUSED, "MixLoRA-style"]


@pytest.fixture(scope="module")
def contenders():
    built = bench_gated.build(torch.float32)
    for name, error in bench_gated.check(built).items():
        assert error <= 1e-4, f"{name} differs from the reference by {error:.2e} (relative)"
    return built


def skip_if_missing(contenders: dict, name: str) -> None:
    if name not in contenders:
        pytest.skip(f"{name}: {bench_gated.fused_kernel_error()}")


@pytest.mark.parametrize("name", NAMES)
def test_gated_forward(benchmark, contenders, name):  # noqa: F811 (pytest-benchmark's fixture)
    skip_if_missing(contenders, name)
    benchmark.group = "gated forward"
    benchmark.pedantic(contenders[name].forward, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name", NAMES)
def test_gated_train_step(benchmark, contenders, name):  # noqa: F811
    skip_if_missing(contenders, name)
    benchmark.group = "gated train step"
    benchmark.pedantic(contenders[name].train_step, rounds=5, iterations=1, warmup_rounds=1)

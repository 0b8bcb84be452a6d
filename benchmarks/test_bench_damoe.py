"""DA-MoE against the dense FFN it wraps, at SAM3's fusion-encoder shape (issue #2).

x [4, 1024, 256], F = 2048, E = 4, k = 2, r = 8, gelu, fp32 on the CPU (bf16 on a GPU).  Contenders: the
dense FFN, DAMoE on every available backend (reference, torch, and the compiled/fused ones when built),
and a standard MoE of full experts.  Each is checked against the reference before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from dasam3 import benchmark
from dasam3.layers import DAMoE, param_report
from dasam3_kernels import available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
NAMES = ["dense FFN", *(f"DAMoE {b}" for b in available_backends(DEVICE)), "standard MoE (full experts)"]


@pytest.fixture(scope="module")
def contenders():
    built = benchmark.build_contenders(benchmark.BenchShape(), DEVICE, DTYPE)
    tolerance = 1e-4 if DTYPE == torch.float32 else 2e-2
    for name, error in benchmark.check_contenders(built).items():
        assert error <= tolerance, f"{name} differs from the reference by {error:.2e} (relative)"
    return built


@pytest.mark.parametrize("name", NAMES)
def test_forward(benchmark, contenders, name):  # noqa: F811 (pytest-benchmark's fixture)
    benchmark.group = "forward"
    benchmark.pedantic(contenders[name].forward, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name", NAMES)
def test_train_step(benchmark, contenders, name):  # noqa: F811
    benchmark.group = "train step"
    benchmark.pedantic(contenders[name].train_step, rounds=5, iterations=1, warmup_rounds=1)


def test_parameter_table(capsys):
    dpe = param_report(DAMoE(256, 2048, num_experts=4, top_k=2, rank=8))
    full = param_report(DAMoE(256, 2048, num_experts=4, top_k=2, expert_type="full"))
    with capsys.disabled():
        print(f"\ntrainable per layer: DPE {dpe.damoe_added:,} vs full experts {full.damoe_added:,} "
              f"(reduction {100 * dpe.reduction:.2f} %)")
    assert dpe.reduction > 0.95

"""DA-MoE against the dense FFN it wraps, at SAM3's fusion-encoder shape (issues #2, #12).

x [4, 1024, 256], F = 2048, E = 4, k = 2, r = 8, gelu.  On the CPU: fp32, and bf16 as mixed precision
(fp32 modules under torch.autocast("cpu", torch.bfloat16)), each at 1 and 2 threads; on a GPU: bf16.
Contenders: the dense FFN, DAMoE on every available backend (reference, torch, and the compiled/fused
ones when built), and a standard MoE of full experts.  Each is checked against the reference before it
is timed.  The summary after the run names the CPU model and the instruction set of the kernels.
"""

from __future__ import annotations

import pytest
import torch

from dasam3 import benchmark
from dasam3.layers import DAMoE, param_report
from dasam3_kernels import available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# name: (dtype, under autocast)
PRECISIONS = {"bf16": (torch.bfloat16, False)} if DEVICE == "cuda" else \
    {"fp32": (torch.float32, False), "bf16-autocast": (torch.bfloat16, True)}
THREADS = [None] if DEVICE == "cuda" else [1, 2]
NAMES = ["dense FFN", *(f"DAMoE {b}" for b in available_backends(DEVICE)), "standard MoE (full experts)"]


@pytest.fixture(scope="module", params=list(PRECISIONS))
def contenders(request):
    dtype, autocast = PRECISIONS[request.param]
    built = benchmark.build_contenders(benchmark.BenchShape(), DEVICE, dtype, autocast=autocast)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for name, error in benchmark.check_contenders(built).items():
        assert error <= tolerance, f"{name} differs from the reference by {error:.2e} (relative)"
    return request.param, built


@pytest.fixture(params=THREADS, ids=lambda n: "gpu" if n is None else f"{n}-threads")
def threads(request):
    previous = torch.get_num_threads()
    if request.param is not None:
        torch.set_num_threads(request.param)
    yield "" if request.param is None else f", {request.param} threads"
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", NAMES)
def test_forward(benchmark, contenders, threads, name):  # noqa: F811 (pytest-benchmark's fixture)
    precision, built = contenders
    benchmark.group = f"forward, {precision}{threads}"
    benchmark.pedantic(built[name].forward, rounds=5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("name", NAMES)
def test_train_step(benchmark, contenders, threads, name):  # noqa: F811
    precision, built = contenders
    benchmark.group = f"train step, {precision}{threads}"
    benchmark.pedantic(built[name].train_step, rounds=5, iterations=1, warmup_rounds=1)


def test_parameter_table(capsys):
    dpe = param_report(DAMoE(256, 2048, num_experts=4, top_k=2, rank=8))
    full = param_report(DAMoE(256, 2048, num_experts=4, top_k=2, expert_type="full"))
    with capsys.disabled():
        print(f"\ntrainable per layer: DPE {dpe.damoe_added:,} vs full experts {full.damoe_added:,} "
              f"(reduction {100 * dpe.reduction:.2f} %)")
    assert dpe.reduction > 0.95

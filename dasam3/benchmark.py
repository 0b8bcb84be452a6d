"""Side-by-side timing of the DA-MoE layer against the dense FFN it wraps.

Used by `dasam3 bench` and by `pytest benchmarks/ --benchmark`.  Every contender is built on the same
frozen W0 and checked against the reference before it is timed.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dasam3.layers import DAMoE, aux_loss, param_report
from dasam3_kernels import available_backends

_ACTIVATION_MODULES = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "gelu_tanh": lambda: nn.GELU("tanh")}


@dataclass(frozen=True)
class BenchShape:
    """x: [batch, tokens, d_model]; the defaults are SAM3's fusion-encoder FFN with the paper's E, k, r."""

    batch: int = 4
    tokens: int = 1024
    d_model: int = 256
    d_ff: int = 2048
    experts: int = 4
    top_k: int = 2
    rank: int = 8
    activation: str = "gelu"


@dataclass
class Contender:
    """A module on a fixed input; `forward()` and `train_step()` are what gets timed."""

    name: str
    module: nn.Module
    x: torch.Tensor
    grad: torch.Tensor

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        return self.module(self.x)

    def train_step(self) -> None:
        """Forward + backward: gradients for x and every trainable parameter (aux loss included)."""
        self.module.zero_grad(set_to_none=True)
        inputs = self.x.detach().requires_grad_()
        loss = (self.module(inputs) * self.grad).sum() + aux_loss(self.module)
        loss.backward()


def _frozen_ffn(shape: BenchShape, device, dtype) -> tuple[nn.Linear, nn.Linear]:
    factory = {"device": device, "dtype": dtype}
    fc1, fc2 = nn.Linear(shape.d_model, shape.d_ff, **factory), nn.Linear(shape.d_ff, shape.d_model, **factory)
    return fc1.requires_grad_(False), fc2.requires_grad_(False)


def build_contenders(shape: BenchShape = BenchShape(), device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, backends: list[str] | None = None,
                     seed: int = 0) -> dict[str, Contender]:
    """The dense FFN, DAMoE on every available backend, and a standard MoE of full experts."""
    device = torch.device(device)
    torch.manual_seed(seed)
    fc1, fc2 = _frozen_ffn(shape, device, dtype)
    x = torch.randn(shape.batch, shape.tokens, shape.d_model, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    layer_kwargs = dict(num_experts=shape.experts, top_k=shape.top_k, rank=shape.rank, activation=shape.activation)

    dense = nn.Sequential(fc1, _ACTIVATION_MODULES[shape.activation](), fc2)
    contenders = {"dense FFN": Contender("dense FFN", dense, x, grad)}
    for backend in backends or available_backends(device):
        layer = DAMoE.from_ffn(fc1, fc2, backend=backend, **layer_kwargs)
        with torch.no_grad():  # non-zero experts, so the correctness check sees every term
            for param in layer.expert_parameters():
                param.add_(0.02 * torch.randn_like(param))
        contenders[f"DAMoE {backend}"] = Contender(f"DAMoE {backend}", layer.train(), x, grad)
    full = DAMoE.from_ffn(fc1, fc2, expert_type="full", backend="torch", **layer_kwargs)
    contenders["standard MoE (full experts)"] = Contender("standard MoE (full experts)", full.train(), x, grad)
    return contenders


def check_contenders(contenders: dict[str, Contender]) -> dict[str, float]:
    """Max error of each DAMoE contender's output relative to the reference backend's, on its weights."""
    errors = {}
    for name, contender in contenders.items():
        layer = contender.module
        if not isinstance(layer, DAMoE) or layer.expert_type != "lowrank" or layer.backend == "reference":
            continue
        reference = DAMoE.from_ffn(layer.fc1, layer.fc2, num_experts=layer.num_experts, top_k=layer.top_k,
                                   rank=layer.rank, activation=layer.activation, backend="reference")
        reference.load_state_dict(layer.state_dict())
        with torch.no_grad():
            expected = reference.train()(contender.x)
        actual = contender.forward()
        errors[name] = ((actual - expected).abs().max() / expected.abs().max()).item()
    return errors


def time_ms(fn: Callable[[], object], min_run_time: float = 1.0, min_repeats: int = 5) -> float:
    """Median wall time of `fn` in milliseconds, synchronising CUDA around every call."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times: list[float] = []
    while sum(times) < min_run_time or len(times) < min_repeats:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(shape: BenchShape = BenchShape(), device: str = "cpu", dtype: torch.dtype = torch.float32,
        backends: list[str] | None = None, min_run_time: float = 1.0) -> dict:
    """Time every contender (forward, training step), with ratios to the dense FFN and the param table."""
    contenders = build_contenders(shape, device, dtype, backends)
    errors = check_contenders(contenders)
    rows = []
    for name, contender in contenders.items():
        contender.forward()  # warm-up: allocator, lazy kernel compilation
        contender.train_step()
        rows.append({"name": name, "forward_ms": time_ms(contender.forward, min_run_time),
                     "train_step_ms": time_ms(contender.train_step, min_run_time),
                     "max_rel_error_vs_reference": errors.get(name)})
    dense = rows[0]
    for row in rows:
        row["forward_ratio"] = row["forward_ms"] / dense["forward_ms"]
        row["train_step_ratio"] = row["train_step_ms"] / dense["train_step_ms"]
    dpe = param_report(next(c.module for c in contenders.values() if isinstance(c.module, DAMoE)))
    full = param_report(contenders["standard MoE (full experts)"].module)
    return {
        "shape": asdict(shape), "device": str(device), "hardware": hardware_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
        "params": {"dpe_trainable": dpe.damoe_added, "full_experts_trainable": full.damoe_added,
                   "reduction": dpe.reduction},
    }


def hardware_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def format_report(result: dict) -> str:
    shape = result["shape"]
    lines = [
        f"x [{shape['batch']}, {shape['tokens']}, {shape['d_model']}], F = {shape['d_ff']}, E = {shape['experts']}, "
        f"k = {shape['top_k']}, r = {shape['rank']}, {shape['activation']}, {result['dtype']}, {result['device']} "
        f"({result['hardware']}, {result['threads']} threads), torch {result['torch']}",
        "",
        f"{'contender':<30} {'forward ms':>11} {'x dense':>8} {'train ms':>10} {'x dense':>8} {'rel err':>9}",
    ]
    for row in result["rows"]:
        error = "" if row["max_rel_error_vs_reference"] is None else f"{row['max_rel_error_vs_reference']:.1e}"
        lines.append(f"{row['name']:<30} {row['forward_ms']:>11.1f} {row['forward_ratio']:>7.2f}x "
                     f"{row['train_step_ms']:>10.1f} {row['train_step_ratio']:>7.2f}x {error:>9}")
    params = result["params"]
    lines += [
        "",
        "trainable parameters per layer (experts + router):",
        f"  DPE (low-rank experts)   {params['dpe_trainable']:>12,}",
        f"  full experts             {params['full_experts_trainable']:>12,}",
        f"  reduction                {100 * params['reduction']:>11.2f} %",
    ]
    return "\n".join(lines)

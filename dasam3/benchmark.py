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
from dasam3_kernels import available_backends, resolve_backend

try:
    import resource  # the page-fault counts; Unix only
except ImportError:  # Windows
    resource = None

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
    """A module on a fixed input; `forward()` and `train_step()` are what gets timed.

    autocast: None, or the dtype the fp32 module runs in under torch.autocast (mixed precision).
    """

    name: str
    module: nn.Module
    x: torch.Tensor
    grad: torch.Tensor
    autocast: torch.dtype | None = None

    def _precision(self):
        return torch.autocast(self.x.device.type, dtype=self.autocast, enabled=self.autocast is not None)

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        with self._precision():
            return self.module(self.x)

    def train_step(self) -> None:
        """Forward + backward: gradients for x and every trainable parameter (aux loss included)."""
        self.module.zero_grad(set_to_none=True)
        inputs = self.x.detach().requires_grad_()
        with self._precision():
            y = self.module(inputs)
        loss = (y.to(self.grad.dtype) * self.grad).sum() + aux_loss(self.module)
        loss.backward()


def _frozen_ffn(shape: BenchShape, device, dtype) -> tuple[nn.Linear, nn.Linear]:
    factory = {"device": device, "dtype": dtype}
    fc1, fc2 = nn.Linear(shape.d_model, shape.d_ff, **factory), nn.Linear(shape.d_ff, shape.d_model, **factory)
    return fc1.requires_grad_(False), fc2.requires_grad_(False)


def build_contenders(shape: BenchShape = BenchShape(), device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, backends: list[str] | None = None,
                     seed: int = 0, autocast: bool = False) -> dict[str, Contender]:
    """The dense FFN, DAMoE on every available backend, and a standard MoE of full experts.

    autocast: fp32 modules and input run under torch.autocast(device, dtype) (mixed precision);
    otherwise modules and input are in `dtype`.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    storage = torch.float32 if autocast else dtype
    fc1, fc2 = _frozen_ffn(shape, device, storage)
    x = torch.randn(shape.batch, shape.tokens, shape.d_model, device=device, dtype=storage)
    grad = torch.randn_like(x)
    layer_kwargs = dict(num_experts=shape.experts, top_k=shape.top_k, rank=shape.rank, activation=shape.activation)
    under = dtype if autocast else None

    dense = nn.Sequential(fc1, _ACTIVATION_MODULES[shape.activation](), fc2)
    contenders = {"dense FFN": Contender("dense FFN", dense, x, grad, under)}
    for backend in backends or available_backends(device):
        layer = DAMoE.from_ffn(fc1, fc2, backend=backend, **layer_kwargs)
        with torch.no_grad():  # non-zero experts, so the correctness check sees every term
            for param in layer.expert_parameters():
                param.add_(0.02 * torch.randn_like(param))
        contenders[f"DAMoE {backend}"] = Contender(f"DAMoE {backend}", layer.train(), x, grad, under)
    full = DAMoE.from_ffn(fc1, fc2, expert_type="full", backend="torch", **layer_kwargs)
    contenders["standard MoE (full experts)"] = Contender("standard MoE (full experts)", full.train(), x, grad, under)
    return contenders


def check_contenders(contenders: dict[str, Contender]) -> dict[str, float]:
    """Max error of each DAMoE contender's output relative to the fp32 reference backend's, on its weights
    (the same rounded values for a half-precision layer)."""
    errors = {}
    for name, contender in contenders.items():
        layer = contender.module
        if not isinstance(layer, DAMoE) or layer.expert_type != "lowrank" or layer.backend == "reference":
            continue
        reference = DAMoE.from_ffn(layer.fc1, layer.fc2, num_experts=layer.num_experts, top_k=layer.top_k,
                                   rank=layer.rank, activation=layer.activation, backend="reference")
        reference.load_state_dict(layer.state_dict())
        with torch.no_grad():
            expected = reference.float().train()(contender.x.float())
        actual = contender.forward().float()
        errors[name] = ((actual - expected).abs().max() / expected.abs().max()).item()
    return errors


# What a measurement reads: wall time, or the CPU time of the whole process (all its threads), which
# a loaded machine inflates far less (time spent descheduled is not counted; OpenMP's spin-waiting is).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def minor_page_faults() -> int | None:
    """The process's minor page faults so far (None where the OS does not count them).  A CPU contender
    whose fresh large tensors fault in anew each call (glibc returned their pages) pays for it in time."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_times(fns: dict[str, Callable[[], object]], min_run_time: float = 1.0,
                      min_repeats: int = 5, clock: str = "wall",
                      faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Each function's time in seconds (`clock`: a CLOCKS name) per round, after one warm-up call each:
    every round runs each function once, in turn (round robin), so that load from other processes hits
    them alike; CUDA synchronised around calls.  Rounds continue until every function has `min_repeats`
    runs and the slowest `min_run_time` seconds.  `faults`, when given, receives each call's minor page
    faults by name."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    now = CLOCKS[clock]
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while min(map(len, times.values())) < min_repeats or max(map(sum, times.values())) < min_run_time:
        for name, fn in fns.items():
            sync()
            faults_before, start = minor_page_faults(), now()
            fn()
            sync()
            times[name].append(now() - start)
            if faults is not None and faults_before is not None:
                faults.setdefault(name, []).append(minor_page_faults() - faults_before)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], min_run_time: float = 1.0,
                        min_repeats: int = 5, clock: str = "wall") -> dict[str, float]:
    """Median time in ms of each function over the rounds of `interleaved_times`."""
    times = interleaved_times(fns, min_run_time, min_repeats, clock)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def paired_ratios(times: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Each function's time over the baseline's, as the median over rounds of the ratio within a round:
    the two ran a moment apart, so load that drifts between rounds cancels in the pair (a ratio of
    medians can pair a quiet round with a loaded one)."""
    return {name: statistics.median(t / b for t, b in zip(ts, times[baseline])) for name, ts in times.items()}


def run(shape: BenchShape = BenchShape(), device: str = "cpu", dtype: torch.dtype = torch.float32,
        backends: list[str] | None = None, min_run_time: float = 1.0, autocast: bool = False,
        threads: list[int] | None = None, clock: str = "wall") -> dict:
    """Time every contender side by side (forward, training step) once per thread count (CPU; default:
    the current count), with ratios to the dense FFN, the choice "auto" makes and the param table."""
    contenders = build_contenders(shape, device, dtype, backends, autocast=autocast)
    errors = check_contenders(contenders)
    runs = [timed_run(contenders, errors, min_run_time, n, clock) for n in threads or [torch.get_num_threads()]]
    dpe = param_report(next(c.module for c in contenders.values() if isinstance(c.module, DAMoE)))
    full = param_report(contenders["standard MoE (full experts)"].module)
    return {
        "shape": asdict(shape), "device": str(device), "hardware": hardware_name(device),
        "isa": isa_description(device), "dtype": str(dtype).replace("torch.", ""),
        "precision": f"fp32 modules under torch.autocast({torch.device(device).type!r}, {dtype})" if autocast
        else f"modules and input in {dtype}",
        "auto_picks": resolve_backend("auto", torch.device(device), dtype=dtype).name,
        "torch": torch.__version__, "clock": clock, "load_average": _load_average(), "runs": runs,
        "params": {"dpe_trainable": dpe.damoe_added, "full_experts_trainable": full.damoe_added,
                   "reduction": dpe.reduction},
    }


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages at the end of the run (other processes' load skews timings)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def timed_run(contenders: dict[str, Contender], errors: dict[str, float], min_run_time: float,
               threads: int, clock: str) -> dict:
    """Forward and training step of every contender, interleaved round by round on `threads` threads:
    each one's median time and its paired ratio (`paired_ratios`) to the dense FFN."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        forward_faults: dict[str, list[int]] = {}
        train_faults: dict[str, list[int]] = {}
        forward = interleaved_times({n: c.forward for n, c in contenders.items()}, min_run_time, clock=clock,
                                    faults=forward_faults)
        train = interleaved_times({n: c.train_step for n, c in contenders.items()}, min_run_time, clock=clock,
                                  faults=train_faults)
    finally:
        torch.set_num_threads(previous)
    forward_ratio, train_ratio = paired_ratios(forward, "dense FFN"), paired_ratios(train, "dense FFN")
    rows = [{"name": name, "forward_ms": 1e3 * statistics.median(forward[name]),
             "train_step_ms": 1e3 * statistics.median(train[name]),
             "forward_ratio": forward_ratio[name], "train_step_ratio": train_ratio[name],
             "forward_page_faults": _median_or_none(forward_faults.get(name)),
             "train_step_page_faults": _median_or_none(train_faults.get(name)),
             "max_rel_error_vs_reference": errors.get(name)} for name in contenders]
    return {"threads": threads, "rows": rows, "fastest": fastest_damoe_backends(rows)}


def _median_or_none(values: list[int] | None) -> float | None:
    return statistics.median(values) if values else None


def fastest_damoe_backends(rows: list[dict]) -> dict[str, str]:
    """The DAMoE backend with the shortest forward and training step among the candidates of "auto"
    (the reference oracle is none), by row name "DAMoE <backend>"."""
    candidates = [row for row in rows if row["name"].startswith("DAMoE ") and row["name"] != "DAMoE reference"]
    if not candidates:
        return {}
    return {step: min(candidates, key=lambda row: row[f"{step}_ms"])["name"].removeprefix("DAMoE ")
            for step in ("forward", "train_step")}


def isa_description(device: str | torch.device) -> str:
    """For the CPU: the instruction set the dasam3 kernel library was built for (the variant loaded),
    ATen's, and whether the CPU multiplies bf16/fp16 natively (what decides the kernels' GEMM dtype)."""
    if torch.device(device).type != "cpu":
        return ""
    from dasam3_kernels import cpp_ops

    try:
        variant = cpp_ops.cpu_variant()
    except RuntimeError:
        variant = "not built"
    flags = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = [name for name in ("avx512_bf16", "amx_bf16", "avx512_fp16", "amx_fp16") if flags.get(name)]
    return (f"dasam3 kernel {variant}, ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"native half GEMMs: {', '.join(native) or 'none'}")


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
        f"k = {shape['top_k']}, r = {shape['rank']}, {shape['activation']}, {result['precision']}, "
        f"{result['device']} ({result['hardware']}), torch {result['torch']}",
        f"median {result['clock']} time, contenders interleaved round by round; x dense: the median of the "
        f"per-round ratios; load average at the end: {result['load_average']}",
    ]
    if result["isa"]:
        lines.append(result["isa"])
    for run in result["runs"]:
        lines += ["", f"{run['threads']} thread(s)", f"{'contender':<30} {'forward ms':>11} {'x dense':>8} "
                  f"{'train ms':>10} {'x dense':>8} {'rel err':>9} {'page faults/call':>17}"]
        for row in run["rows"]:
            error = "" if row["max_rel_error_vs_reference"] is None else f"{row['max_rel_error_vs_reference']:.1e}"
            lines.append(f"{row['name']:<30} {row['forward_ms']:>11.1f} {row['forward_ratio']:>7.2f}x "
                         f"{row['train_step_ms']:>10.1f} {row['train_step_ratio']:>7.2f}x {error:>9} "
                         f"{page_faults_text(row):>17}")
        lines.append(auto_line(result["auto_picks"], run["fastest"]))
    params = result["params"]
    lines += [
        "",
        "trainable parameters per layer (experts + router):",
        f"  DPE (low-rank experts)   {params['dpe_trainable']:>12,}",
        f"  full experts             {params['full_experts_trainable']:>12,}",
        f"  reduction                {100 * params['reduction']:>11.2f} %",
    ]
    return "\n".join(lines)


def page_faults_text(row: dict) -> str:
    """"forward / train" median minor page faults per call, or "" where they were not counted."""
    counts = (row.get("forward_page_faults"), row.get("train_step_page_faults"))
    return "" if None in counts else f"{counts[0]:.0f} / {counts[1]:.0f}"


def auto_line(auto: str, fastest: dict[str, str]) -> str:
    """Whether `auto` is the fastest measured (`fastest_damoe_backends`), and which were."""
    measured = ", ".join(f"{step.replace('_', ' ')} {name}" for step, name in fastest.items())
    slower = [step.replace("_", " ") for step, name in fastest.items() if name != auto]
    verdict = f"SLOWER than the fastest measured in: {', '.join(slower)}" if slower else "the fastest measured"
    return f"auto picks {auto!r} here ({verdict}; fastest: {measured or 'no candidate timed'})"

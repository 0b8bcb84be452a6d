"""The backend registry: which implementation of the DA-MoE layer runs, and why.

A backend bundles the mixture-of-experts op (and optionally a fused router and a full-expert op).
Every backend computes exactly the reference's function (SPEC section 2).  Backends that need a build
or a device are loaded lazily: asking for one by name that cannot run raises a RuntimeError saying
what is missing and how to get it; "auto" quietly takes the fastest one that can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference, routing, torch_path

BACKENDS = ("auto", "reference", "torch", "triton", "cuda", "cpu")

# Fastest first, per device type, for backend="auto" (on CUDA it also depends on the dtype: _cuda_order).
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# backend="auto" on the CPU, fastest first per compute dtype (x's dtype, or autocast's), as measured by
# `python -m dasam3 bench --dtype D --activation A --threads 1 2` at SAM3's shape, forward and training
# step (benchmarks/results/cpu_bench_*.json; `dasam3 bench` flags a run in which auto's pick is slower):
# - float32: fused 0.86-0.93x the dense FFN forward, 1.13-1.15x training; torch 1.31-1.40x / 1.96-2.04x
#   (AMD EPYC AVX512; the issue-12 Intel Xeon AMX run: fused 0.94-1.04x / 1.22-1.26x, torch 1.78x / 2.51x);
# - bfloat16 (autocast): both multiply in bf16 (oneDNN: AVX512-BF16 / AMX), the fused kernel's per-token
#   passes beat torch's chunked elementwise passes: fused 0.97-1.34x / 1.17-1.61x, torch 1.58-2.31x /
#   2.90-3.83x (EPYC AVX512-BF16, 1 thread, CPU time, the dense FFN's time swinging most);
# - float16: without AVX512-FP16/AMX-FP16 the fused kernel multiplies in fp32 while torch runs emulated
#   fp16 GEMMs: forward 233 ms fused vs 1858 ms torch (EPYC, 1 thread, benchmarks/bench_cpu_kernel.py).
# Gated layers (SwiGLU, LLaMA-like shape, benchmarks/bench_gated.py, EPYC, 1 thread, CPU time): fused
# 1.10x / 1.18x the dense gated FFN forward (fp32 / bf16), 1.16x / 1.37x training; torch 1.11x / 1.31x,
# 1.29x / 1.88x: the fused kernel is the faster of the two, so gated layers take the same order.
_CPU_AUTO_ORDER = {torch.float32: ("cpu", "torch"), torch.bfloat16: ("cpu", "torch"),
                   torch.float16: ("cpu", "torch")}


def auto_order(device_type: str, dtype: torch.dtype | None = None) -> tuple[str, ...]:
    """The backends "auto" tries on `device_type` for compute dtype `dtype`, fastest first."""
    if device_type == "cuda":
        return _cuda_order(dtype)
    if device_type == "cpu" and dtype in _CPU_AUTO_ORDER:
        return _CPU_AUTO_ORDER[dtype]
    return _AUTO_ORDER.get(device_type, ())


def _cuda_order(dtype: torch.dtype | None) -> tuple[str, ...]:
    """"auto" on a GPU: fp16/bf16 run the fused kernels.  fp32 runs Triton's only on TF32 tensor cores,
    where torch allows TF32 (`torch.backends.cuda.matmul.allow_tf32`); exact fp32 `tl.dot`s use no
    tensor core and lose to cuBLAS, so the torch path (cuBLAS) takes fp32 otherwise, and fp64 always."""
    if dtype is None or dtype in (torch.float16, torch.bfloat16):
        return _AUTO_ORDER["cuda"]
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return ("triton", "torch")
    return ("torch",)


@dataclass(frozen=True)
class Backend:
    """One implementation of the layer's ops.

    lowrank_moe: `(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B,
        fc2_A, fc2_B, scale, activation[, dropout_mask, dropout_p]) -> y`, the contract of
        `reference.lowrank_moe_reference`: `y_t = Σ_j p_tj · expert_{e_tj}(x_t)` for any weights p.
    gated_moe: the contract of `reference.gated_moe_reference` (gated FFNs).
    route: `(x, weight, bias, ctx_bias, top_k) -> (indices, weights, probs)` as `routing.route`.
    full_moe: the contract of `reference.full_moe_reference`, or None if not implemented.
    supports_dropout: whether lowrank_moe takes `dropout_mask` / `dropout_p`.
    device_error: returns None when the backend can run on that device, else why it cannot.
    """

    name: str
    lowrank_moe: Callable[..., torch.Tensor]
    gated_moe: Callable[..., torch.Tensor]
    route: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = routing.route
    full_moe: Callable[..., torch.Tensor] | None = None
    supports_dropout: bool = False
    device_error: Callable[[torch.device], str | None] = lambda device: None


def _load_reference() -> Backend:
    return Backend("reference", reference.lowrank_moe_reference, full_moe=reference.full_moe_reference,
                   gated_moe=reference.gated_moe_reference, supports_dropout=True)


def _load_torch() -> Backend:
    return Backend("torch", torch_path.lowrank_moe, full_moe=torch_path.full_moe, gated_moe=torch_path.gated_moe,
                   supports_dropout=True)


def _load_triton() -> Backend:
    try:
        from . import triton_ops
    except ModuleNotFoundError as error:
        if error.name != "triton":
            raise
        raise RuntimeError(
            "backend 'triton' is not available: the package `triton` is not installed "
            "(`pip install 'dasam3[triton]'`; it runs on CUDA GPUs, or on the CPU with TRITON_INTERPRET=1)"
        ) from error
    return Backend("triton", triton_ops.lowrank_moe, route=triton_ops.route, gated_moe=triton_ops.gated_moe,
                   device_error=triton_ops.device_error)


def _load_extension(device_type: str) -> Backend:
    from . import cpp_ops  # the csrc/ kernels; RuntimeError (what is missing, how to build) when not built

    return cpp_ops.backend(device_type)


_LOADERS: dict[str, Callable[[], Backend]] = {
    "reference": _load_reference,
    "torch": _load_torch,
    "triton": _load_triton,
    "cpu": lambda: _load_extension("cpu"),
    "cuda": lambda: _load_extension("cuda"),
}


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


# Every load's outcome, by name: "auto" resolves on every forward, and a missing build stays missing.
# A plain dict filled outside the traced path, not functools.lru_cache: torch.compile traces through
# an lru_cache into the loader (a library load, PyTorch's CPU capability query: graph breaks) but
# reads a dict as a constant.
_LOADED: dict[str, Backend | RuntimeError] = {}


def _load_or_error(name: str) -> Backend | RuntimeError:
    _load_once(name)
    return _LOADED[name]


@torch.compiler.assume_constant_result  # torch.compile runs it eagerly, once, at trace time
def _load_once(name: str) -> bool:
    if name not in _LOADED:
        try:
            _LOADED[name] = _LOADERS[name]()
        except RuntimeError as error:
            _LOADED[name] = error
    return True


def forget_loaded() -> None:
    """Drops every cached load outcome (for tests that simulate a missing build)."""
    _LOADED.clear()


def load_backend(name: str) -> Backend:
    """The backend called `name`; RuntimeError (what is missing, how to get it) if it cannot load."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("'auto' names a choice, not a backend: use resolve_backend")
    loaded = _load_or_error(name)
    if isinstance(loaded, RuntimeError):
        raise RuntimeError(*loaded.args) from loaded.__cause__
    return loaded


def _try_load(name: str) -> Backend | None:
    loaded = _load_or_error(name)
    return None if isinstance(loaded, RuntimeError) else loaded


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on `device`, fastest first where "auto" has an order."""
    device = torch.device(device)
    names = [n for n in BACKENDS if n != "auto"]
    usable = [n for n in names if (b := _try_load(n)) is not None and b.device_error(device) is None]
    order = _AUTO_ORDER.get(device.type, ())
    return sorted(usable, key=lambda n: order.index(n) if n in order else len(order))


def resolve_backend(name: str, device: torch.device, *, full_experts: bool = False,
                    dropout: bool = False, dtype: torch.dtype | None = None) -> Backend:
    """The backend that runs a forward on `device` in compute dtype `dtype` (None: "auto"'s default).

    "auto" takes the fastest one that can run this call (`auto_order`).  A named backend must be able
    to run it, except for dropout in training, which the fused kernels leave to the torch path.
    """
    if name == "auto":
        for candidate in auto_order(device.type, dtype):
            backend = _try_load(candidate)
            if backend is not None and _serves(backend, device, full_experts, dropout):
                return backend
        return load_backend("torch")  # serves every call on every device
    backend = load_backend(name)
    error = backend.device_error(device)
    if error is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {error}")
    if full_experts and backend.full_moe is None:
        raise ValueError(f"backend {name!r} implements expert_type='lowrank' only, got expert_type='full'")
    if dropout and not backend.supports_dropout:
        return load_backend("torch")
    return backend


def _serves(backend: Backend, device: torch.device, full_experts: bool, dropout: bool) -> bool:
    return (backend.device_error(device) is None
            and (not full_experts or backend.full_moe is not None)
            and (not dropout or backend.supports_dropout))


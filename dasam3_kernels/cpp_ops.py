"""The compiled csrc/ kernels as the "cpu" and "cuda" backends.

`setup.py` builds `dasam3_kernels/_C_cpu_<isa>` (the CPU kernels, one library per instruction set:
avx512, avx2, default) and, where torch has CUDA and nvcc is found, `dasam3_kernels/_C_cuda`.  This
module defines the ops `torch.ops.dasam3.lowrank_moe_fwd` / `lowrank_moe_bwd` (their schemas, autograd
formula and fake (shape) implementations, so they work with `torch.autograd`, `torch.library.opcheck`
and `torch.compile`); each library only implements them, for CPU or for CUDA, so either loads without
the other.  Of the CPU libraries it loads the best one the machine runs (PyTorch's own CPU capability
decides, so `ATEN_CPU_CAPABILITY=avx2|default` lowers it as it does for ATen).
"""

from __future__ import annotations

import functools
import importlib.machinery
from pathlib import Path

import torch

from .backends import Backend
from .torch_path import frozen_ffn_grads, frozen_gate_grads

_PACKAGE_DIR = Path(__file__).resolve().parent
# Library variants to try, best first, for PyTorch's CPU capability on this machine.
_CPU_VARIANTS = {"AVX512": ("avx512", "avx2", "default"), "AVX2": ("avx2", "default")}
# The op schemas (outputs: see csrc/damoe_common.h), defined here once for both libraries.
_SCHEMAS = (
    "lowrank_moe_fwd(Tensor x, Tensor indices, Tensor weights, Tensor fc1_weight, Tensor? fc1_bias, "
    "Tensor fc2_weight, Tensor? fc2_bias, Tensor? fc1_A, Tensor? fc1_B, Tensor? fc2_A, Tensor? fc2_B, "
    "float scale, str activation, bool save_for_backward, Tensor? gate_weight=None, Tensor? gate_bias=None, "
    "Tensor? gate_A=None, Tensor? gate_B=None) -> (Tensor, Tensor, Tensor, Tensor)",
    "lowrank_moe_bwd(Tensor grad_y, Tensor x, Tensor indices, Tensor weights, Tensor fc1_weight, "
    "Tensor fc2_weight, Tensor? fc2_bias, Tensor? fc1_A, Tensor? fc1_B, Tensor? fc2_A, Tensor? fc2_B, "
    "Tensor pre, Tensor U, Tensor V, float scale, str activation, bool need_grad_x, bool need_fc_grads, "
    "Tensor? gate_weight=None, Tensor? gate_A=None, Tensor? gate_B=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
_BUILD_HINT = (
    "build it with a C++ compiler present: install torch first, then `pip install -e . --no-build-isolation` "
    "(or `python setup.py build_ext --inplace`) in the dasam3 source tree"
)


def _library_path(stem: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _PACKAGE_DIR / f"{stem}{suffix}"
        if path.exists():
            return path
    return None


def _load(path: Path, what: str) -> None:
    try:
        torch.ops.load_library(str(path))
    except OSError as error:  # e.g. built against another torch: undefined symbols
        raise RuntimeError(f"{what} at {path} does not load ({error}); rebuild it: {_BUILD_HINT}") from error


@functools.lru_cache(maxsize=None)
def _define_ops() -> torch.library.Library:
    """Defines the ops (once) before a library implements them; the returned Library keeps them alive."""
    library = torch.library.Library("dasam3", "FRAGMENT")
    for schema in _SCHEMAS:
        library.define(schema)
    _register_python_parts()
    return library


@functools.lru_cache(maxsize=None)
def cpu_variant() -> str:
    """Loads the CPU library (once) and returns its instruction set: "avx512", "avx2" or "default"."""
    capability = torch.backends.cpu.get_cpu_capability()
    for variant in _CPU_VARIANTS.get(capability, ("default",)):
        path = _library_path(f"_C_cpu_{variant}")
        if path is not None:
            _define_ops()
            _load(path, f"the dasam3 CPU extension ({variant})")
            return variant
    raise RuntimeError(
        f"backend 'cpu' is not available: the compiled dasam3 extension is not built (no "
        f"_C_cpu_{{avx512,avx2,default}} library in {_PACKAGE_DIR}); {_BUILD_HINT}"
    )


@functools.lru_cache(maxsize=None)
def load_cuda() -> None:
    """Loads the CUDA library (once); it needs neither the CPU library nor a GPU to load."""
    path = _library_path("_C_cuda")
    if path is None:
        raise RuntimeError(
            f"backend 'cuda' is not available: the dasam3 CUDA extension is not built (no _C_cuda library in "
            f"{_PACKAGE_DIR}); it needs a CUDA build of torch and nvcc at build time: "
            f"`DASAM3_BUILD_CUDA=1 pip install -e . --no-build-isolation`"
        )
    _define_ops()
    _load(path, "the dasam3 CUDA extension")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in, and keep U and V in: float32 for half types."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _stacked_width(A: torch.Tensor | None) -> int:
    return 0 if A is None else A.shape[0] * A.shape[1]


def _fwd_fake(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B,
              scale, activation, save_for_backward, gate_weight=None, gate_bias=None, gate_A=None, gate_B=None):
    tokens, compute = x.shape[0], _compute_dtype(x.dtype)
    y = x.new_empty(tokens, fc2_weight.shape[0])
    if not save_for_backward:  # each output its own empty tensor: op outputs must not alias
        return y, x.new_empty(0), x.new_empty(0, dtype=compute), x.new_empty(0, dtype=compute)
    pre = x.new_empty(tokens, fc1_weight.shape[0] * (2 if gate_weight is not None else 1))
    U = x.new_empty((tokens, _stacked_width(fc1_A) + _stacked_width(gate_A)) if fc1_A is not None or gate_A is not None
                    else 0, dtype=compute)
    V = x.new_empty((tokens, _stacked_width(fc2_A)) if fc2_A is not None else 0, dtype=compute)
    return y, pre, U, V


def _bwd_fake(grad_y, x, indices, weights, fc1_weight, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B, pre, U, V,
              scale, activation, need_grad_x, need_fc_grads, gate_weight=None, gate_A=None, gate_B=None):
    lora, gate_lora = ([x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)
                        for t in factors] for factors in ((fc1_A, fc1_B, fc2_A, fc2_B), (gate_A, gate_B)))
    grad_pre = x.new_empty(pre.shape if need_fc_grads else 0)
    mixed = x.new_empty((x.shape[0], fc1_weight.shape[0]) if need_fc_grads else 0)
    return (x.new_empty(x.shape if need_grad_x else 0), weights.new_empty(weights.shape), *lora, grad_pre, mixed,
            *gate_lora)


def _setup_context(ctx, inputs, output) -> None:
    x, indices, weights, W1, b1, W2, b2, A1, B1, A2, B2, scale, activation, save_for_backward, *gate = inputs
    gate_weight, _, gate_A, gate_B = (*gate, None, None, None, None)[:4]  # the gate arguments are optional
    _, pre, U, V = output
    ctx.save_for_backward(x, indices, weights, W1, W2, b2, A1, B1, A2, B2, pre, U, V, gate_weight, gate_A, gate_B)
    ctx.config = (scale, activation, save_for_backward, len(inputs))
    # pre, U, V are saved state, not results: no gradient flows into them, and none is materialised
    # (a zero [T, d_ff] gradient for pre cost a 16 ms memset per training step at SAM3's shape)
    ctx.mark_non_differentiable(pre, U, V)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, *_unused_grads):
    scale, activation, saved, num_inputs = ctx.config
    if grad_y is None:  # y got no gradient (grads are not materialised): none for any input
        return (None,) * num_inputs
    x, indices, weights, W1, W2, b2, A1, B1, A2, B2, pre, U, V, Wg, Ag, Bg = ctx.saved_tensors
    if not saved:
        raise RuntimeError("dasam3::lowrank_moe_fwd ran with save_for_backward=False, so it cannot be "
                           "differentiated; call it with save_for_backward=True (lowrank_moe does)")
    need = (*ctx.needs_input_grad, False, False, False, False)[:18]  # the gate's 4 inputs are optional
    # dW1, db1 (and the gate's dW_g, db_g) need grad_pre and dW2 needs mixed; db2 needs neither
    need_fc = any(need[3:6]) or any(need[14:16])
    gx, gp, gA1, gB1, gA2, gB2, grad_pre, mixed, gAg, gBg = torch.ops.dasam3.lowrank_moe_bwd(
        grad_y, x, indices, weights, W1, W2, b2, A1, B1, A2, B2, pre, U, V, scale, activation, need[0], need_fc,
        Wg, Ag, Bg)
    grad_pre_fc1, grad_pre_gate = grad_pre, None
    if Wg is not None and need_fc:  # gated: grad_pre is [T, 2F], fc1's half then the gate's
        grad_pre_fc1, grad_pre_gate = grad_pre.chunk(2, dim=1)
    frozen = frozen_ffn_grads(need, x, grad_y, weights, grad_pre_fc1, mixed, b2)
    grads = (gx if need[0] else None, None, gp if need[2] else None, *frozen,
             gA1 if need[7] else None, gB1 if need[8] else None, gA2 if need[9] else None,
             gB2 if need[10] else None, None, None, None,
             *frozen_gate_grads(need[14:16], x, grad_pre_gate),
             gAg if need[16] else None, gBg if need[17] else None)
    return grads[:num_inputs]


def _register_python_parts() -> None:
    """Fake implementations and autograd; runs once, from the cached `_define_ops`."""
    torch.library.register_fake("dasam3::lowrank_moe_fwd", _fwd_fake)
    torch.library.register_fake("dasam3::lowrank_moe_bwd", _bwd_fake)
    torch.library.register_autograd("dasam3::lowrank_moe_fwd", _backward, setup_context=_setup_context)


def lowrank_moe(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    fc1_A: torch.Tensor | None,
    fc1_B: torch.Tensor | None,
    fc2_A: torch.Tensor | None,
    fc2_B: torch.Tensor | None,
    scale: float,
    activation: str,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The contract of `reference.lowrank_moe_reference` (x: [T, D] → y: [T, D]) on the fused kernels.

    No dropout: the layer sends training with dropout to the torch path (`supports_dropout=False`).
    """
    return gated_moe(x, indices, weights, None, None, fc1_weight, fc1_bias, fc2_weight, fc2_bias, None, None,
                     fc1_A, fc1_B, fc2_A, fc2_B, scale, activation, dropout_mask, dropout_p)


def gated_moe(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    gate_weight: torch.Tensor | None,
    gate_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    gate_A: torch.Tensor | None,
    gate_B: torch.Tensor | None,
    fc1_A: torch.Tensor | None,
    fc1_B: torch.Tensor | None,
    fc2_A: torch.Tensor | None,
    fc2_B: torch.Tensor | None,
    scale: float,
    activation: str,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The contract of `reference.gated_moe_reference` (x: [T, D] → y: [T, D]; gate_weight [F, D],
    gate_bias [F], gate_A [E, r, D], gate_B [E, F, r]) on the fused kernels: W_g x and W1 x once per token
    on the same x tile, W2 once on Σ_j p_j h_j.  gate_weight=None is the plain FFN (`lowrank_moe`).

    No dropout, as `lowrank_moe`.
    """
    if dropout_mask is not None:
        raise ValueError(f"the compiled kernels implement no dropout, got dropout_mask with dropout_p={dropout_p}")
    tensors = (x, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B,
               gate_weight, gate_bias, gate_A, gate_B)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    gate = () if gate_weight is None else (gate_weight, gate_bias, gate_A, gate_B)
    return torch.ops.dasam3.lowrank_moe_fwd(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                            fc1_A, fc1_B, fc2_A, fc2_B, float(scale), activation, save, *gate)[0]


def _device_error(device_type: str, device: torch.device) -> str | None:
    if device.type != device_type:
        return f"backend {device_type!r} runs on {device_type} tensors, got a {device.type} device"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def backend(device_type: str) -> Backend:
    """The "cpu" or "cuda" backend; RuntimeError (what is missing, how to build it) when not built."""
    if device_type == "cuda":
        load_cuda()
    else:
        cpu_variant()
    return Backend(name=device_type, lowrank_moe=lowrank_moe, gated_moe=gated_moe,
                   device_error=functools.partial(_device_error, device_type))

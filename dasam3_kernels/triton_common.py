"""What the fused Triton kernels share: launch policy, dtypes, stacked-factor addressing, activations.

The kernels run compiled on CUDA GPUs and, for CI, in Triton's interpreter on CPU tensors
(`TRITON_INTERPRET=1`, which must be set before this module is imported: Triton decides at
`@triton.jit` time).  Two interpreter quirks shape this module: it mishandles bf16 arithmetic (so every
operand is cast to fp32 there) and it cannot benchmark (so autotuning is GPU-only).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import triton
import triton.language as tl

from .torch_path import stack_down

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Below this many tokens a launch is too small for autotuning to pay for its benchmarking (and the
# test suites, with their many shape/dtype specialisations, stay quick to compile).
AUTOTUNE_MIN_TOKENS = 2048

_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
               torch.float64: tl.float64}


def device_error(device: torch.device) -> str | None:
    """None when the kernels can run on `device`, else why not (SPEC section 2)."""
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    if device.type == "cpu":
        return ("the Triton kernels run on CPU tensors only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before importing dasam3_kernels")
    return f"the Triton kernels need a CUDA device (or the CPU with TRITON_INTERPRET=1), got {device.type!r}"


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of the kernels' fp32 `tl.dot`s: TF32 tensor cores where torch allows them for
    its own fp32 matmuls (`torch.backends.cuda.matmul.allow_tf32`), else exact fp32 ("ieee"); fp16/bf16
    run on tensor cores whatever it says."""
    allowed = dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if allowed else "ieee"


def kernel_dtypes(dtype: torch.dtype) -> tuple[tl.dtype, tl.dtype]:
    """(operand dtype of tl.dot, accumulator dtype) for tensors of `dtype`.

    GPUs multiply fp16/bf16 on tensor cores with fp32 accumulators; the interpreter multiplies in
    fp32 (its bf16 is broken); float64 (gradcheck) stays float64 throughout.
    """
    if dtype not in _DOT_DTYPES:
        raise ValueError(f"the Triton kernels take float16, bfloat16, float32 or float64, got {dtype}")
    if dtype == torch.float64:
        return tl.float64, tl.float64
    return (tl.float32 if INTERPRET else _DOT_DTYPES[dtype]), tl.float32


class Gate(NamedTuple):
    """The gate projection of a gated FFN (SwiGLU/GeGLU, h = act(g) ⊙ u): weight [F, D], bias [F] or None,
    lora factors A [E, r, D] and B [E, F, r] or None (not adapted)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    A: torch.Tensor | None
    B: torch.Tensor | None


def lora_layout(fc1_A: torch.Tensor | None, fc2_A: torch.Tensor | None,
                gate: Gate | None) -> tuple[int, int, tuple[bool, bool]]:
    """(E, r, adapted): experts and rank of the lora factors ((1, 1) when there are none), and whether fc1
    and the gate have down factors (`lora_shrink`'s columns, in that order)."""
    gate_A = None if gate is None else gate.A
    factor = next((f for f in (fc1_A, gate_A, fc2_A) if f is not None), None)
    E, R = (factor.shape[0], factor.shape[1]) if factor is not None else (1, 1)
    return E, R, (fc1_A is not None, gate_A is not None)


def lora_shrink(x: torch.Tensor, factors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """x Aᵀ of the adapted down factors among `factors` (fc1's A1, then the gate's Ag), every expert
    stacked: [T, n·E·r] in x's dtype, one small GEMM for all (None when none is adapted)."""
    stacked = [stack_down(A) for A in factors if A is not None]
    return None if not stacked else x @ torch.cat(stacked).t()


def lora_columns(stacked: torch.Tensor, adapted: tuple[bool, bool], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fc1's, the gate's) columns of a `[..., n·E·r]` tensor laid out as `lora_shrink`'s; a projection
    that is not adapted gets the whole tensor, which its kernel never reads (same strides either way)."""
    fc1, gate = adapted
    return (stacked[..., :width] if fc1 else stacked,
            stacked[..., width * fc1:width * (fc1 + gate)] if gate else stacked)


def block(n: int, lo: int, hi: int) -> int:
    """A power-of-two block covering `n` if it can, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def stacked_width(num_experts: int, rank: int) -> int:
    """Width of the all-experts stacked rank dimension E·r, padded to a power of two >= 16."""
    return block(num_experts * rank, 16, 1 << 20)


def autotuned(kernel: triton.runtime.JITFunction, configs: list[triton.Config], key: list[str]):
    """`kernel` autotuned over `configs` on a GPU; None in the interpreter, which cannot benchmark."""
    return None if INTERPRET else triton.autotune(configs=configs, key=key)(kernel)


def pick_kernel(kernel, tuned, num_tokens: int, fixed: dict) -> tuple:
    """(the launchable kernel, its launch keywords): autotuned on big GPU launches, else `fixed`."""
    if tuned is not None and num_tokens >= AUTOTUNE_MIN_TOKENS:
        return tuned, {}
    return kernel, fixed


# -- launches, and recording them for the static report ----------------------------------------------


@dataclass
class Launch:
    """One kernel launch as a wrapper made it: the kernel, its arguments, and the configs it can run
    (every autotune config, or the one fixed config in `kwargs`)."""

    kernel: triton.runtime.JITFunction
    grid: Callable[[dict], tuple] | tuple
    args: tuple
    kwargs: dict
    configs: list[dict]  # each: block sizes, num_warps, num_stages (empty: all in kwargs)


_recorded: list[Launch] | None = None
_recorded_sm_count = 0


@contextlib.contextmanager
def recording_launches(sm_count: int) -> Iterator[list[Launch]]:
    """Inside, `launch` records instead of running, and the wrappers size their grids for a GPU with
    `sm_count` SMs: the wrappers can then be called on meta tensors, with no GPU, to see what they would
    launch (`dasam3_kernels.static_report` compiles exactly that)."""
    global _recorded, _recorded_sm_count
    previous = _recorded, _recorded_sm_count
    _recorded, _recorded_sm_count = [], sm_count
    try:
        yield _recorded
    finally:
        _recorded, _recorded_sm_count = previous


def launch(kernel, grid, *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, or its record inside `recording_launches`."""
    if _recorded is None:
        kernel[grid](*args, **kwargs)
        return
    if isinstance(kernel, triton.runtime.Autotuner):
        _recorded.append(Launch(kernel.fn, grid, args, kwargs, [c.all_kwargs() for c in kernel.configs]))
    else:
        _recorded.append(Launch(kernel, grid, args, kwargs, [{}]))


def multiprocessor_count(device: torch.device) -> int:
    """SMs of `device` (of the recorded GPU inside `recording_launches`)."""
    if _recorded is not None:
        return _recorded_sm_count
    return torch.cuda.get_device_properties(device).multi_processor_count


# -- device functions ------------------------------------------------------------------------------


@triton.jit
def factor_offsets(c, n, RANK, stride_e, stride_q, stride_n):
    """Offsets of the stacked low-rank factor: column c = e·RANK + q of expert e, feature n.

    One formula serves every factor: A [E, r, n] and B [E, n, r] differ only in which stride is
    the rank's (`stride_q`) and which the feature's (`stride_n`).
    """
    return (c // RANK) * stride_e + (c % RANK) * stride_q + n * stride_n


@triton.jit
def load_tile(ptr, rows, cols, mask_rows, mask_cols, stride_row, stride_col):
    """The [rows, cols] tile of a strided matrix, zero outside the masks."""
    return tl.load(ptr + rows[:, None] * stride_row + cols[None, :] * stride_col,
                   mask=mask_rows[:, None] & mask_cols[None, :], other=0.0)


@triton.jit
def load_stacked(ptr, offs_c, offs_n, mask_n, RANK, ER, stride_e, stride_q, stride_n, TRANSPOSED: tl.constexpr):
    """A tile of a stacked factor: [E·r (padded), BN], or [BN, E·r] when TRANSPOSED; zero padded."""
    if TRANSPOSED:
        tile = tl.load(ptr + factor_offsets(offs_c[None, :], offs_n[:, None], RANK, stride_e, stride_q, stride_n),
                       mask=mask_n[:, None] & (offs_c[None, :] < ER), other=0.0)
    else:
        tile = tl.load(ptr + factor_offsets(offs_c[:, None], offs_n[None, :], RANK, stride_e, stride_q, stride_n),
                       mask=(offs_c[:, None] < ER) & mask_n[None, :], other=0.0)
    return tile


@triton.jit
def load_slot(idx_ptr, p_ptr, rows, mask_t, j, stride_it, stride_ij, stride_pt, stride_pj, offs_c, RANK, ER,
              ACC: tl.constexpr):
    """Routing slot j of a token tile: (weights p_j [BT], segment mask [BT, E·r] of expert e_j's columns)."""
    experts = tl.load(idx_ptr + rows * stride_it + j * stride_ij, mask=mask_t, other=0)
    p = tl.load(p_ptr + rows * stride_pt + j * stride_pj, mask=mask_t, other=0.0).to(ACC)
    segment = ((offs_c[None, :] // RANK) == experts[:, None]) & (offs_c[None, :] < ER)
    return p, segment


@triton.jit
def lora_expand(pre, u, segment, b1t, scale, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """(z_j = pre + s (u ⊙ seg_j) B1ᵀ, the masked u_j): the slot's expert's fc1 delta, as one masked dot."""
    u_j = tl.where(segment, u, 0.0).to(DOT)
    return tl.dot(u_j, b1t, input_precision=PRECISION, out_dtype=ACC) * scale + pre, u_j


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    """act(z) for the layer activations (gelu: exact erf form); the compiler drops the unused act'."""
    h, _ = activation_and_grad(z, ACTIVATION)
    return h


@triton.jit
def activation_and_grad(z, ACTIVATION: tl.constexpr):
    """(act(z), act'(z)), as `activations.activation_and_grad`."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        h = z * cdf
        dh = cdf + z * pdf
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        half_one_plus_tanh = tl.sigmoid(2.0 * inner)
        tanh = 2.0 * half_one_plus_tanh - 1.0
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
        h = z * half_one_plus_tanh
        dh = half_one_plus_tanh + 0.5 * z * (1.0 - tanh * tanh) * dinner
    elif ACTIVATION == "relu":
        h = tl.maximum(z, 0.0)
        dh = tl.where(z > 0.0, 1.0, 0.0).to(z.dtype)
    elif ACTIVATION == "quick_gelu":  # z σ(1.702 z)
        sig = tl.sigmoid(1.702 * z)
        h = z * sig
        dh = sig * (1.0 + 1.702 * z * (1.0 - sig))
    else:
        sig = tl.sigmoid(z)
        h = z * sig
        dh = sig * (1.0 + z * (1.0 - sig))
    return h, dh

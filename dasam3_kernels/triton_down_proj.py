"""Down-projection GEMM with the low-rank term and the routed bias in its epilogue.

    out = inner @ W + scale · mid @ stacked(factor) + (Σ_j p_j) · bias

Tiles over (tokens, N) with a K-loop over the inner dimension.  The forward's fc2 uses it as
`y = m W2ᵀ + s V B2ᵀ + (Σ_j p_j) b2` (mid = V, the reduced fc2 shrink; factor = B2); the backward's
dx uses the same kernel as `dx = grad_pre W1 + grad_U A1` (mid = grad_U; factor = A1; no bias).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRET, autotuned, block, dot_precision, kernel_dtypes, launch, load_stacked,
                            load_tile, pick_kernel, stacked_width)


@triton.jit
def _down_projection_kernel(
    a_ptr, w_ptr, mid_ptr, fac_ptr, bias_ptr, p_ptr, out_ptr,
    T, N, K, ER, scale,
    stride_at, stride_ak, stride_wk, stride_wn, stride_mt, stride_mc, stride_fe, stride_fq, stride_fn,
    stride_pt, stride_pj, stride_ot, stride_on,
    K_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, RANK: tl.constexpr, ER_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask_n = offs_n < N
    rows = offs_t.to(tl.int64)

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        ak = load_tile(a_ptr, rows, kk, mask_t, mask_k, stride_at, stride_ak).to(DOT)
        wk = load_tile(w_ptr, kk, offs_n, mask_k, mask_n, stride_wk, stride_wn).to(DOT)
        acc = tl.dot(ak, wk, acc, input_precision=PRECISION)

    if HAS_LORA:  # one more K-chunk: the stacked rank of all experts
        offs_c = tl.arange(0, ER_PAD)
        # s folded into mid, so the chunk accumulates into acc: a second [BT, BN] result would spill at 128 x 256.
        mid = load_tile(mid_ptr, rows, offs_c, mask_t, offs_c < ER, stride_mt, stride_mc).to(ACC) * scale
        fac = load_stacked(fac_ptr, offs_c, offs_n, mask_n, RANK, ER, stride_fe, stride_fq, stride_fn, False).to(DOT)
        acc = tl.dot(mid.to(DOT), fac, acc, input_precision=PRECISION)
    if HAS_BIAS:  # Σ_j p_j b2: the reference's function of p even when p does not sum to one
        p_sum = tl.zeros((BLOCK_T,), dtype=ACC)
        for j in tl.static_range(K_SLOTS):
            p_sum += tl.load(p_ptr + rows * stride_pt + j * stride_pj, mask=mask_t, other=0.0).to(ACC)
        acc += p_sum[:, None] * tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]

    tl.store(out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_n[None, :])


_GPU_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bt, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 32, 8, 4))
]
_tuned = autotuned(_down_projection_kernel, _GPU_CONFIGS, key=["N", "K", "ER"])


def down_projection(inner: torch.Tensor, weight_kn: torch.Tensor, mid: torch.Tensor | None = None,
                    factor: torch.Tensor | None = None, scale: float = 1.0, bias: torch.Tensor | None = None,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """`inner @ weight_kn + scale · mid @ stack(factor) + weights.sum(-1)[:, None] · bias`.

    inner: [T, K]; weight_kn: [K, N] (any strides, e.g. `W2.t()`); mid: [T, E·r] (fp32);
    factor: [E, r, N] (any strides, e.g. `B2.transpose(1, 2)`); bias: [N]; weights: [T, k].
    Returns [T, N] in inner's dtype.
    """
    T, K = inner.shape
    N = weight_kn.shape[1]
    out = torch.empty(T, N, device=inner.device, dtype=inner.dtype)
    if T == 0 or N == 0:
        return out
    has_lora = mid is not None
    E, R = (factor.shape[0], factor.shape[1]) if has_lora else (1, 1)
    mid = mid if has_lora else inner.new_empty(1, 1)
    fac = factor if has_lora else inner.new_empty(1, 1, 1)
    p = weights if weights is not None else inner.new_empty(1, 1)
    dot, acc = kernel_dtypes(inner.dtype)
    fixed = {"BLOCK_T": block(T, 16, 64), "BLOCK_N": block(N, 16, 128 if INTERPRET else 64),
             "BLOCK_K": block(K, 16, 128 if INTERPRET else 64), "num_warps": 4, "num_stages": 2}
    kernel, config = pick_kernel(_down_projection_kernel, _tuned, T, fixed)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    launch(
        kernel, grid,
        inner, weight_kn, mid, fac, bias if bias is not None else inner, p, out,
        T, N, K, E * R, float(scale),
        inner.stride(0), inner.stride(1), weight_kn.stride(0), weight_kn.stride(1), mid.stride(0), mid.stride(1),
        fac.stride(0), fac.stride(1), fac.stride(2), p.stride(0), p.stride(1), out.stride(0), out.stride(1),
        K_SLOTS=p.shape[1], HAS_BIAS=bias is not None, HAS_LORA=has_lora, DOT=dot, ACC=acc,
        PRECISION=dot_precision(inner.dtype), RANK=R, ER_PAD=stacked_width(E, R), **config,
    )
    return out

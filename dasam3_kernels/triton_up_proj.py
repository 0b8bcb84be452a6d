"""Fused up-projection of the low-rank mixture: fc1 + every expert's fc1 delta + activation + mixing.

For a tile of tokens × a tile of F, one K-loop over D accumulates the frozen product `x W1ᵀ` (fp32
accumulators), and for a gated FFN (SwiGLU/GeGLU, `GATED`) the gate's `x W_gᵀ` in the same pass over x.
The shrinks `u = x A1ᵀ` (and `u_g = x A_gᵀ`) of all experts stacked (`[T, E·r]`) are one small GEMM
done once by the caller (not once per F tile), as in the backward.  Then, per routing slot j, the
expand of u's segment of expert e_tj with B1[e_tj] (a masked dot over the stacked rank), the
activation (gated: h_j = act(x W_gᵀ + b_g + s (u_g ⊙ seg_j) B_gᵀ) ⊙ z_j), and in the epilogue

    m   = Σ_j p_j h_j                       (stored, [T, F]: the down-projection's input)
    V  += Σ_j p_j (h_j A2ᵀ ⊙ seg_j)          (this F tile's share of the fc2 shrink, [T, E·r])

V is a reduction over the F tiles: each tile writes its own slice of a `[F tiles, T, E·r]` buffer
that the caller sums (deterministic), or, with `atomic=True`, adds into one slice with float atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (INTERPRET, Gate, activation, autotuned, block, dot_precision, kernel_dtypes, launch,
                            load_slot, load_stacked, load_tile, lora_columns, lora_expand, lora_layout, lora_shrink,
                            pick_kernel, stacked_width)


@triton.jit
def _up_projection_kernel(
    x_ptr, idx_ptr, p_ptr, w1_ptr, b1_ptr, wg_ptr, bg_ptr, u_ptr, ug_ptr, bb1_ptr, bbg_ptr, a2_ptr, m_ptr, v_ptr,
    T, D, F, ER, scale,
    stride_xt, stride_xd, stride_it, stride_ij, stride_pt, stride_pj, stride_w1f, stride_w1d, stride_wgf, stride_wgd,
    stride_ut, stride_uc, stride_b1e, stride_b1q, stride_b1f, stride_bge, stride_bgq, stride_bgf,
    stride_a2e, stride_a2q, stride_a2f, stride_mt, stride_mf, stride_vs, stride_vt, stride_vc,
    K_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
    HAS_FC1_LORA: tl.constexpr, HAS_GATE_LORA: tl.constexpr, HAS_FC2_LORA: tl.constexpr,
    ACTIVATION: tl.constexpr, ATOMIC: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    RANK: tl.constexpr, ER_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, ER_PAD)
    mask_t = offs_t < T
    mask_f = offs_f < F
    rows = offs_t.to(tl.int64)

    pre = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC)
    if GATED:
        pre_g = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D
        xk = load_tile(x_ptr, rows, kk, mask_t, mask_k, stride_xt, stride_xd).to(DOT)
        w1k = load_tile(w1_ptr, kk, offs_f, mask_k, mask_f, stride_w1d, stride_w1f).to(DOT)
        pre = tl.dot(xk, w1k, pre, input_precision=PRECISION)
        if GATED:
            wgk = load_tile(wg_ptr, kk, offs_f, mask_k, mask_f, stride_wgd, stride_wgf).to(DOT)
            pre_g = tl.dot(xk, wgk, pre_g, input_precision=PRECISION)
    if HAS_BIAS:
        pre += tl.load(b1_ptr + offs_f, mask=mask_f, other=0.0).to(ACC)[None, :]
    if GATED and HAS_GATE_BIAS:
        pre_g += tl.load(bg_ptr + offs_f, mask=mask_f, other=0.0).to(ACC)[None, :]

    if HAS_FC1_LORA:  # u [BT, E·r] and the B1 stacked [E·r, F] tile: the expand of every expert at once
        u = load_tile(u_ptr, rows, offs_c, mask_t, offs_c < ER, stride_ut, stride_uc).to(ACC)
        b1t = load_stacked(bb1_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_b1e, stride_b1q, stride_b1f, False).to(DOT)
    if HAS_GATE_LORA:  # the same for the gate
        ug = load_tile(ug_ptr, rows, offs_c, mask_t, offs_c < ER, stride_ut, stride_uc).to(ACC)
        bgt = load_stacked(bbg_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_bge, stride_bgq, stride_bgf, False).to(DOT)
    if HAS_FC2_LORA:  # A2 stacked, transposed to [F, E·r]
        a2t = load_stacked(a2_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_a2e, stride_a2q, stride_a2f, True).to(DOT)

    mixed = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC)
    v = tl.zeros((BLOCK_T, ER_PAD), dtype=ACC)
    for j in tl.static_range(K_SLOTS):
        p, seg = load_slot(idx_ptr, p_ptr, rows, mask_t, j, stride_it, stride_ij, stride_pt, stride_pj, offs_c, RANK, ER,
                           ACC)
        z = pre
        if HAS_FC1_LORA:
            z, _ = lora_expand(pre, u, seg, b1t, scale, DOT, ACC, PRECISION)
        if GATED:
            zg = pre_g
            if HAS_GATE_LORA:
                zg, _ = lora_expand(pre_g, ug, seg, bgt, scale, DOT, ACC, PRECISION)
            h = activation(zg, ACTIVATION) * z
        else:
            h = activation(z, ACTIVATION)
        mixed += p[:, None] * h
        if HAS_FC2_LORA:
            vj = tl.dot(h.to(DOT), a2t, input_precision=PRECISION, out_dtype=ACC)
            v += tl.where(seg, vj, 0.0) * p[:, None]

    tl.store(m_ptr + rows[:, None] * stride_mt + offs_f[None, :] * stride_mf, mixed.to(m_ptr.dtype.element_ty),
             mask=mask_t[:, None] & mask_f[None, :])
    if HAS_FC2_LORA:
        v_ptrs = v_ptr + rows[:, None] * stride_vt + offs_c[None, :] * stride_vc
        mask_v = mask_t[:, None] & (offs_c[None, :] < ER)
        if ATOMIC:
            tl.atomic_add(v_ptrs, v, mask=mask_v)
        else:
            tl.store(v_ptrs + pid_f.to(tl.int64) * stride_vs, v, mask=mask_v)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bt, bk, w, s in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 128, 4, 2))
]
_tuned = autotuned(_up_projection_kernel, _GPU_CONFIGS, key=["D", "F", "ER", "GATED"])


def _f_block(d_ff: int, gated: bool) -> int:
    """F tile: not autotuned, since the V buffer has one slice per F tile.  64, not 128: at 128 every
    config spills (the chained dots make Triton split the warps along tokens only, so each warp holds
    whole [K, BLOCK_F] operands; see `python -m dasam3 kernels`).  32 for a gated FFN, whose second
    accumulator and expand made some configs spill at 64 on sm_80 (at the cost of twice the V slices)."""
    return block(d_ff, 16, 32 if gated else 64)


def up_projection(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, fc1_weight: torch.Tensor,
                  fc1_bias: torch.Tensor | None, fc1_A: torch.Tensor | None, fc1_B: torch.Tensor | None,
                  fc2_A: torch.Tensor | None, scale: float, activation_name: str,
                  atomic: bool = False, gate: Gate | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(m [T, F] in x's dtype, V [T, E·r] fp32 or None)` as the module docstring says.

    x: [T, D]; indices, weights: [T, k]; fc1_weight: [F, D]; fc1_A: [E, r, D]; fc1_B: [E, F, r];
    fc2_A: [E, r, F] (None: projection not adapted); gate: a gated FFN's gate projection (None: plain).
    """
    T, D = x.shape
    F = fc1_weight.shape[0]
    gated = gate is not None
    gate_A, gate_B = (gate.A, gate.B) if gated else (None, None)
    E, R, adapted = lora_layout(fc1_A, fc2_A, gate)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    m = torch.empty(T, F, device=x.device, dtype=x.dtype)
    block_f = _f_block(F, gated)
    splits = 1 if atomic else triton.cdiv(F, block_f)
    v = None
    if fc2_A is not None:
        v = (torch.zeros if atomic else torch.empty)(splits, T, E * R, device=x.device, dtype=acc_dtype)
    if T == 0:
        return m, None if v is None else v.sum(0)

    dot, acc = kernel_dtypes(x.dtype)
    unused = x.new_empty(1, 1, 1)
    shrunk = lora_shrink(x, [fc1_A, gate_A])
    shrunk = unused[0] if shrunk is None else shrunk
    wg, bg = (gate.weight, gate.bias) if gated else (fc1_weight, None)
    b1, bbg, a2 = (t if t is not None else unused for t in (fc1_B, gate_B, fc2_A))
    vbuf = v if v is not None else x.new_empty(1, 1, 1, dtype=acc_dtype)
    fixed = {"BLOCK_T": block(T, 16, 64), "BLOCK_K": block(D, 16, 128 if INTERPRET else 64), "num_warps": 4,
             "num_stages": 2}
    kernel, config = pick_kernel(_up_projection_kernel, None if atomic else _tuned, T, fixed)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(F, block_f))  # noqa: E731
    launch(
        kernel, grid,
        x, indices, weights, fc1_weight, fc1_bias if fc1_bias is not None else x, wg, bg if bg is not None else x,
        *lora_columns(shrunk, adapted, E * R), b1, bbg, a2, m, vbuf,
        T, D, F, E * R, float(scale),
        x.stride(0), x.stride(1), indices.stride(0), indices.stride(1), weights.stride(0), weights.stride(1),
        fc1_weight.stride(0), fc1_weight.stride(1), wg.stride(0), wg.stride(1),
        shrunk.stride(0), shrunk.stride(1), b1.stride(0), b1.stride(2), b1.stride(1),
        bbg.stride(0), bbg.stride(2), bbg.stride(1),
        a2.stride(0), a2.stride(1), a2.stride(2), m.stride(0), m.stride(1),
        vbuf.stride(0), vbuf.stride(1), vbuf.stride(2),
        K_SLOTS=indices.shape[1], HAS_BIAS=fc1_bias is not None, GATED=gated, HAS_GATE_BIAS=bg is not None,
        HAS_FC1_LORA=adapted[0], HAS_GATE_LORA=adapted[1], HAS_FC2_LORA=fc2_A is not None,
        ACTIVATION=activation_name, ATOMIC=atomic, DOT=dot, ACC=acc, PRECISION=dot_precision(x.dtype), RANK=R,
        ER_PAD=stacked_width(E, R), BLOCK_F=block_f, **config,
    )
    return m, None if v is None else (v[0] if atomic else v.sum(0))

"""Backward of the fused up-projection: recompute the pre-activations from x, never store [T, k, F].

For a tile of F, each program walks a strided subset of the token tiles.  Per token tile, one K-loop
over D accumulates the recomputed `x W1ᵀ` and the incoming `grad_m = g W2`; with the stacked
`u = x A1ᵀ` and `g B2` ([T, E·r] each, small GEMMs done once by the caller), per routing slot j the
recomputed h_j and act'(z_j) give

    dp_j     += Σ_f h_j grad_m + s Σ_r (h_j A2ᵀ ⊙ seg_j) (g B2)        (F-tile share of the routing grad)
    grad_h_j  = p_j grad_m + (s p_j (g B2 ⊙ seg_j)) A2
    grad_z_j  = grad_h_j ⊙ act'(z_j);   grad_pre = Σ_j grad_z_j           (stored, [T, F])
    grad_U   += s Σ_j (grad_z_j B1) ⊙ seg_j                              (F-tile share, [T, E·r])
    dA2      += Σ_j (s p_j (g B2 ⊙ seg_j))ᵀ h_j;  dB1 += s Σ_j grad_z_jᵀ (u ⊙ seg_j)   (token-split shares)

Every cross-program reduction goes to its own slice of a split buffer that the caller sums
(deterministic), or, with `atomic=True`, into one slice with float atomics.  dx, dA1 and dB2 follow
from these with the down-projection kernel and two small GEMMs (see `triton_ops`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .torch_path import stack_up
from .triton_common import (INTERPRET, activation_and_grad, autotuned, block, dot_precision, factor_offsets,
                            kernel_dtypes, launch, load_slot, load_stacked, load_tile, lora_expand,
                            multiprocessor_count, pick_kernel, stacked_width)
from .triton_up_proj import fc1_shrink


@triton.jit
def _backward_kernel(
    x_ptr, g_ptr, idx_ptr, p_ptr, w1_ptr, b1_ptr, w2_ptr, u_ptr, bb1_ptr, a2_ptr, gb2_ptr,
    gpre_ptr, dp_ptr, gu_ptr, da2_ptr, db1_ptr,
    T, D, F, ER, scale, TOKEN_SPLITS,
    stride_xt, stride_xd, stride_gt, stride_gd, stride_it, stride_ij, stride_pt, stride_pj,
    stride_w1f, stride_w1d, stride_w2d, stride_w2f, stride_ut, stride_uc, stride_b1e, stride_b1q, stride_b1f,
    stride_a2e, stride_a2q, stride_a2f, stride_gbt, stride_gbc,
    stride_gpt, stride_gpf, stride_dps, stride_dpt, stride_dpj, stride_gus, stride_gut, stride_guc,
    stride_da2s, stride_da2e, stride_da2q, stride_da2f, stride_db1s, stride_db1e, stride_db1q, stride_db1f,
    K_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_FC1_LORA: tl.constexpr, HAS_FC2_LORA: tl.constexpr,
    ACTIVATION: tl.constexpr, ATOMIC: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    RANK: tl.constexpr, ER_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_f = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, ER_PAD)
    mask_f = offs_f < F
    mask_c = offs_c < ER
    # Slices of the F-tile and token-split reductions (int64: slice offsets outgrow int32 first).
    split_f = pid_f.to(tl.int64) * (0 if ATOMIC else 1)
    split_t = pid_s.to(tl.int64) * (0 if ATOMIC else 1)

    if HAS_BIAS:
        b1 = tl.load(b1_ptr + offs_f, mask=mask_f, other=0.0).to(ACC)
    # The small [·, E·r] products are written so that no [BT, BF] tile is ever the left operand of a dot
    # (v_jᵀ = A2 h_jᵀ, not h_j A2ᵀ): a chain like that makes Triton split the warps along tokens only, so
    # every warp holds whole [K, BF] operands, and the kernel spills.  Hence the E·r-by-token ("T")
    # copies of u, g B2 and the segment masks.
    if HAS_FC1_LORA:  # B1 stacked [E·r, BF]
        b1s = load_stacked(bb1_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_b1e, stride_b1q, stride_b1f, False).to(DOT)
        db1 = tl.zeros((ER_PAD, BLOCK_F), dtype=ACC)
    if HAS_FC2_LORA:  # A2 stacked [E·r, BF]
        a2s = load_stacked(a2_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_a2e, stride_a2q, stride_a2f, False).to(DOT)
        da2 = tl.zeros((ER_PAD, BLOCK_F), dtype=ACC)

    for tile in range(pid_s, tl.cdiv(T, BLOCK_T), TOKEN_SPLITS):
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        rows = offs_t.to(tl.int64)
        pre = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC)
        grad_m = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < D
            xk = load_tile(x_ptr, rows, kk, mask_t, mask_k, stride_xt, stride_xd).to(DOT)
            gk = load_tile(g_ptr, rows, kk, mask_t, mask_k, stride_gt, stride_gd).to(DOT)
            w1k = load_tile(w1_ptr, kk, offs_f, mask_k, mask_f, stride_w1d, stride_w1f).to(DOT)
            w2k = load_tile(w2_ptr, kk, offs_f, mask_k, mask_f, stride_w2d, stride_w2f).to(DOT)
            pre = tl.dot(xk, w1k, pre, input_precision=PRECISION)
            grad_m = tl.dot(gk, w2k, grad_m, input_precision=PRECISION)
        if HAS_BIAS:
            pre += b1[None, :]
        if HAS_FC1_LORA:
            u = load_tile(u_ptr, rows, offs_c, mask_t, mask_c, stride_ut, stride_uc).to(ACC)
            u_t = load_tile(u_ptr, offs_c, rows, mask_c, mask_t, stride_uc, stride_ut).to(ACC)
        if HAS_FC2_LORA:
            gb2 = load_tile(gb2_ptr, rows, offs_c, mask_t, mask_c, stride_gbt, stride_gbc).to(ACC)
            gb2_t = load_tile(gb2_ptr, offs_c, rows, mask_c, mask_t, stride_gbc, stride_gbt).to(ACC)

        grad_pre = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC)
        grad_u_t = tl.zeros((ER_PAD, BLOCK_T), dtype=ACC)
        # A loop, not unrolled: unrolled, the slots' [BT, BF] temporaries are live together and spill.
        for j in range(K_SLOTS):
            p, seg = load_slot(idx_ptr, p_ptr, rows, mask_t, j, stride_it, stride_ij, stride_pt, stride_pj, offs_c, RANK,
                               ER, ACC)
            experts = tl.load(idx_ptr + rows * stride_it + j * stride_ij, mask=mask_t, other=-1)
            seg_t = ((offs_c[:, None] // RANK) == experts[None, :]) & mask_c[:, None]  # [E·r, BT]
            z = pre
            if HAS_FC1_LORA:
                z, _ = lora_expand(pre, u, seg, b1s, scale, DOT, ACC, PRECISION)
            h, dh = activation_and_grad(z, ACTIVATION)
            dp = tl.sum(h * grad_m, axis=1)
            grad_h = grad_m * p[:, None]
            if HAS_FC2_LORA:
                hd = h.to(DOT)
                v_t = tl.dot(a2s, tl.trans(hd), input_precision=PRECISION, out_dtype=ACC)  # (h_j A2ᵀ)ᵀ
                dp += scale * tl.sum(tl.where(seg_t, v_t * gb2_t, 0.0), axis=0)
                grad_v = (tl.where(seg, gb2, 0.0) * (scale * p)[:, None]).to(DOT)
                grad_v_t = (tl.where(seg_t, gb2_t, 0.0) * (scale * p)[None, :]).to(DOT)
                grad_h += tl.dot(grad_v, a2s, input_precision=PRECISION, out_dtype=ACC)
                da2 = tl.dot(grad_v_t, hd, da2, input_precision=PRECISION)
            grad_z = grad_h * dh
            grad_pre += grad_z
            if HAS_FC1_LORA:
                grad_zd = grad_z.to(DOT)
                grad_u_t += tl.where(seg_t, tl.dot(b1s, tl.trans(grad_zd), input_precision=PRECISION, out_dtype=ACC),
                                     0.0)
                u_jt = tl.where(seg_t, u_t, 0.0).to(DOT)
                db1 = tl.dot(u_jt, grad_zd, db1, input_precision=PRECISION)
            dp_ptrs = dp_ptr + split_f * stride_dps + rows * stride_dpt + j * stride_dpj
            if ATOMIC:
                tl.atomic_add(dp_ptrs, dp, mask=mask_t)
            else:
                tl.store(dp_ptrs, dp, mask=mask_t)

        tl.store(gpre_ptr + rows[:, None] * stride_gpt + offs_f[None, :] * stride_gpf,
                 grad_pre.to(gpre_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_f[None, :])
        if HAS_FC1_LORA:
            gu_ptrs = gu_ptr + split_f * stride_gus + offs_c[:, None] * stride_guc + rows[None, :] * stride_gut
            mask_ct = mask_c[:, None] & mask_t[None, :]
            if ATOMIC:
                tl.atomic_add(gu_ptrs, grad_u_t * scale, mask=mask_ct)
            else:
                tl.store(gu_ptrs, grad_u_t * scale, mask=mask_ct)

    # This program's share of the weight gradients, written straight into [E, r, F] / [E, F, r] layout.
    if HAS_FC2_LORA:
        da2_ptrs = da2_ptr + split_t * stride_da2s + factor_offsets(offs_c[:, None], offs_f[None, :], RANK,
                                                                     stride_da2e, stride_da2q, stride_da2f)
        if ATOMIC:
            tl.atomic_add(da2_ptrs, da2, mask=mask_c[:, None] & mask_f[None, :])
        else:
            tl.store(da2_ptrs, da2, mask=mask_c[:, None] & mask_f[None, :])
    if HAS_FC1_LORA:
        db1_ptrs = db1_ptr + split_t * stride_db1s + factor_offsets(offs_c[:, None], offs_f[None, :], RANK,
                                                                     stride_db1e, stride_db1q, stride_db1f)
        if ATOMIC:
            tl.atomic_add(db1_ptrs, db1 * scale, mask=mask_c[:, None] & mask_f[None, :])
        else:
            tl.store(db1_ptrs, db1 * scale, mask=mask_c[:, None] & mask_f[None, :])


_GPU_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bt, bk, w, s in ((64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 4, 3), (128, 32, 8, 2))
]
_tuned = autotuned(_backward_kernel, _GPU_CONFIGS, key=["D", "F", "ER"])

# Waves of programs (token splits × F tiles) to aim for: one program per SM fits at a time (registers),
# and more splits cost more split-buffer reduction; two waves balance both.
_TARGET_WAVES = 2


def token_splits(num_tokens: int, f_tiles: int, sm_count: int, min_block_t: int = 64) -> int:
    """How many token splits the backward grid has: as many as fill `_TARGET_WAVES` full waves of
    `sm_count` SMs with `f_tiles` F tiles (rounded down: one program more than the waves hold costs a
    whole extra wave), at most one per token tile, at least one."""
    return max(1, min(triton.cdiv(num_tokens, min_block_t), _TARGET_WAVES * sm_count // f_tiles))


@dataclass
class UpProjectionGrads:
    """What the backward kernel produces (reduced): see the module docstring.

    grad_pre: [T, F] in x's dtype; grad_weights: [T, k] (without the Σ_j p_j b2 term); grad_u: [T, E·r]
    (scaled by s; None without fc1 lora); grad_fc1_B: [E, F, r] and grad_fc2_A: [E, r, F] (accumulator
    dtype; None when not adapted).
    """

    grad_pre: torch.Tensor
    grad_weights: torch.Tensor
    grad_u: torch.Tensor | None
    grad_fc1_B: torch.Tensor | None
    grad_fc2_A: torch.Tensor | None


def up_projection_backward(grad_y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                           fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                           fc1_A: torch.Tensor | None, fc1_B: torch.Tensor | None, fc2_A: torch.Tensor | None,
                           fc2_B: torch.Tensor | None, scale: float, activation_name: str,
                           atomic: bool = False) -> UpProjectionGrads:
    """Run the backward kernel and reduce its split buffers.

    grad_y, x: [T, D]; indices, weights: [T, k]; fc1_weight: [F, D]; fc2_weight: [D, F]; lora factors
    as in `reference.lowrank_moe_reference`.
    """
    T, D = x.shape
    F = fc1_weight.shape[0]
    factor = fc1_A if fc1_A is not None else fc2_A
    E, R = (factor.shape[0], factor.shape[1]) if factor is not None else (1, 1)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_f = block(F, 16, 128)
    f_tiles = triton.cdiv(F, block_f)
    splits = 1 if INTERPRET else token_splits(T, f_tiles, multiprocessor_count(x.device))
    split_f, split_t = (1, 1) if atomic else (f_tiles, splits)
    new = torch.zeros if atomic or T == 0 else torch.empty  # T == 0: no program writes its slice
    opts = {"device": x.device, "dtype": acc_dtype}
    unused = x.new_empty(1, 1, 1, 1)  # stands in for the buffers of a projection that is not adapted

    bufs = {
        "grad_pre": torch.empty(T, F, device=x.device, dtype=x.dtype),
        "dp": new(split_f, T, indices.shape[1], **opts),
        "gu": new(split_f, T, E * R, **opts) if fc1_A is not None else unused[0],
        "da2": new(split_t, E, R, F, **opts) if fc2_A is not None else unused,
        "db1": new(split_t, E, F, R, **opts) if fc1_A is not None else unused,
    }
    # The stacked shrinks u = x A1ᵀ and g B2 are [T, E·r]: one small GEMM each, not one per F tile.
    u = fc1_shrink(x, fc1_A) if fc1_A is not None else unused[0, 0]
    gb2 = grad_y @ stack_up(fc2_B) if fc2_A is not None else unused[0, 0]
    b1, a2 = (t if t is not None else unused[0] for t in (fc1_B, fc2_A))
    if T > 0:
        dot, acc = kernel_dtypes(x.dtype)
        fixed = {"BLOCK_T": block(T, 16, 64), "BLOCK_K": block(D, 16, 128 if INTERPRET else 32), "num_warps": 4,
                 "num_stages": 2}
        kernel, config = pick_kernel(_backward_kernel, None if atomic else _tuned, T, fixed)
        launch(
            kernel, (f_tiles, splits),
            x, grad_y, indices, weights, fc1_weight, fc1_bias if fc1_bias is not None else x, fc2_weight,
            u, b1, a2, gb2, *bufs.values(),
            T, D, F, E * R, float(scale), splits,
            *x.stride(), *grad_y.stride(), *indices.stride(), *weights.stride(), *fc1_weight.stride(),
            *fc2_weight.stride(), *u.stride(), b1.stride(0), b1.stride(2), b1.stride(1), *a2.stride(), *gb2.stride(),
            *bufs["grad_pre"].stride(), *bufs["dp"].stride(), *bufs["gu"].stride(), *bufs["da2"].stride(),
            bufs["db1"].stride(0), bufs["db1"].stride(1), bufs["db1"].stride(3), bufs["db1"].stride(2),
            K_SLOTS=indices.shape[1], HAS_BIAS=fc1_bias is not None, HAS_FC1_LORA=fc1_A is not None,
            HAS_FC2_LORA=fc2_A is not None, ACTIVATION=activation_name, ATOMIC=atomic, DOT=dot, ACC=acc,
            PRECISION=dot_precision(x.dtype), RANK=R, ER_PAD=stacked_width(E, R), BLOCK_F=block_f, **config,
        )

    def reduce(name: str, adapted: bool) -> torch.Tensor | None:
        return None if not adapted else bufs[name][0] if atomic else bufs[name].sum(0)

    return UpProjectionGrads(bufs["grad_pre"], reduce("dp", True), reduce("gu", fc1_A is not None),
                             reduce("db1", fc1_A is not None), reduce("da2", fc2_A is not None))

"""Backward of the fused up-projection (plain and gated FFNs), on the frozen products cuBLAS computes.

The frozen GEMMs `x W1ᵀ`, `grad_m = g W2` (and, gated, `x W_gᵀ`) run as torch GEMMs with fp32 results
([T, F] each, `frozen_product`); this kernel is their fused epilogue (biases added here): for a
tile of F, each program walks a strided subset of the token tiles and, per routing slot j, recomputes
the slot's pre-activations and h_j from them (never storing [T, k, F]).  With the stacked shrinks
`u = x A1ᵀ`, `u_g = x A_gᵀ` and `g B2` ([T, E·r], small GEMMs done once by the caller):

    z_j = pre + s (u ⊙ seg_j) B1ᵀ;  plain: h_j = act(z_j);  gated: zg_j = pre_g + s (u_g ⊙ seg_j) B_gᵀ,
          h_j = act(zg_j) ⊙ z_j
    dp_j     += Σ_f h_j grad_m + s Σ_r (h_j A2ᵀ ⊙ seg_j) (g B2)        (F-tile share of the routing grad)
    grad_h_j  = p_j grad_m + (s p_j (g B2 ⊙ seg_j)) A2
    grad_z_j  = grad_h_j ⊙ act'(z_j)  (gated: grad_h_j ⊙ act(zg_j), and grad_zg_j = grad_h_j ⊙ z_j ⊙ act'(zg_j))
    grad_pre  = Σ_j grad_z_j, grad_pre_g = Σ_j grad_zg_j                 (stored, [T, F] each)
    grad_U   += s Σ_j (grad_z_j B1) ⊙ seg_j  (and grad_U_g from grad_zg_j, B_g)   (F-tile shares)
    dA2      += Σ_j (s p_j (g B2 ⊙ seg_j))ᵀ h_j;  dB1 += s Σ_j grad_z_jᵀ (u ⊙ seg_j)  (and dB_g)
                                                                         (token-split shares)

Why the frozen products are not in the kernel: a K-loop accumulating x W1ᵀ and g W2 chained into the
slot loop's dots kept two (gated: three) [BT, BF] fp32 accumulators live next to the per-slot
temporaries and made Triton split the warps along tokens only; every config spilled 1-1.7 KB per thread
on sm_90.  As an epilogue the kernel reloads pre/grad_m per slot (L2 hits) and fits its registers.

Every cross-program reduction goes to its own slice of a split buffer that the caller sums
(deterministic), or, with `atomic=True`, into one slice with float atomics.  dx, dA1, dA_g and dB2
follow from these with the down-projection kernel and small GEMMs (see `triton_ops`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .torch_path import stack_up
from .triton_common import (INTERPRET, Gate, activation_and_grad, autotuned, block, dot_precision, factor_offsets,
                            kernel_dtypes, launch, load_slot, load_stacked, load_tile, lora_columns, lora_expand,
                            lora_layout, lora_shrink, multiprocessor_count, pick_kernel, stacked_width)


@triton.jit
def _store_share(ptrs, value, mask, ATOMIC: tl.constexpr):
    """A program's share of a cross-program reduction: its own slice (stored) or the one slice (added)."""
    if ATOMIC:
        tl.atomic_add(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _shrink_grads(grad_z, u_t, bs, seg_t, grad_u_t, db, DOT: tl.constexpr, ACC: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One slot's share of a down-adapted projection's gradients (fc1's or the gate's), unscaled:
    grad_Uᵀ [E·r, BT] += ((grad_z B) ⊙ seg_j)ᵀ and dB as [E·r, BF] += (u ⊙ seg_j)ᵀ grad_z."""
    grad_zd = grad_z.to(DOT)
    grad_u_t += tl.where(seg_t, tl.dot(bs, tl.trans(grad_zd), input_precision=PRECISION, out_dtype=ACC), 0.0)
    db = tl.dot(tl.where(seg_t, u_t, 0.0).to(DOT), grad_zd, db, input_precision=PRECISION)
    return grad_u_t, db


@triton.jit
def _backward_kernel(
    pre_ptr, gm_ptr, preg_ptr, idx_ptr, p_ptr, u_ptr, ug_ptr, bb1_ptr, bbg_ptr, a2_ptr, gb2_ptr,
    gpre_ptr, dp_ptr, gu_ptr, da2_ptr, db_ptr,
    T, F, ER, scale, TOKEN_SPLITS, b1_ptr, bg_ptr,
    stride_ft, stride_it, stride_ij, stride_pt, stride_pj, stride_ut, stride_uc,
    stride_b1e, stride_b1q, stride_b1f, stride_bge, stride_bgq, stride_bgf,
    stride_a2e, stride_a2q, stride_a2f, stride_gbt, stride_gbc,
    stride_gpt, stride_gpf, stride_dps, stride_dpt, stride_dpj, stride_gus, stride_gut, stride_guc,
    stride_da2s, stride_da2e, stride_da2q, stride_da2f, stride_dbs, stride_dbe, stride_dbq, stride_dbf,
    K_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
    HAS_FC1_LORA: tl.constexpr, HAS_GATE_LORA: tl.constexpr, HAS_FC2_LORA: tl.constexpr, SIDE: tl.constexpr,
    ACTIVATION: tl.constexpr, ATOMIC: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, RANK: tl.constexpr,
    ER_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """One pass (see `_passes`): SIDE 1: fc1's grad_pre, grad_U, dB1 (into gpre_ptr, gu_ptr, db_ptr) and the
    routing ones, dp and dA2; SIDE 2: the gate's grad_pre_g, grad_U_g, dB_g."""
    pid_f = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_c = tl.arange(0, ER_PAD)
    mask_f = offs_f < F
    mask_c = offs_c < ER
    mask_cf = mask_c[:, None] & mask_f[None, :]
    # Slices of the F-tile and token-split reductions (int64: slice offsets outgrow int32 first).
    split_f = pid_f.to(tl.int64) * (0 if ATOMIC else 1)
    split_t = pid_s.to(tl.int64) * (0 if ATOMIC else 1)
    # The side's down factor (u_t, B stacked), when adapted: its shrink gradients are this pass's.
    SIDE_LORA: tl.constexpr = (SIDE == 1 and HAS_FC1_LORA) or (SIDE == 2 and HAS_GATE_LORA)
    ROUTING: tl.constexpr = SIDE == 1

    # The small [·, E·r] products are written so that no [BT, BF] tile is ever the left operand of a dot
    # (v_jᵀ = A2 h_jᵀ, not h_j A2ᵀ): a chain like that makes Triton split the warps along tokens only, so
    # every warp holds whole [K, BF] operands, and the kernel spills.  Hence the E·r-by-token ("T")
    # copies of u, g B2 and the segment masks.
    if HAS_BIAS:
        b1 = tl.load(b1_ptr + offs_f, mask=mask_f, other=0.0).to(ACC)
    if GATED and HAS_GATE_BIAS:
        bg = tl.load(bg_ptr + offs_f, mask=mask_f, other=0.0).to(ACC)
    if HAS_FC1_LORA:  # B1 stacked [E·r, BF]
        b1s = load_stacked(bb1_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_b1e, stride_b1q, stride_b1f, False).to(DOT)
    if HAS_GATE_LORA:  # B_g stacked [E·r, BF]
        bgs = load_stacked(bbg_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_bge, stride_bgq, stride_bgf, False).to(DOT)
    if HAS_FC2_LORA:  # A2 stacked [E·r, BF]
        a2s = load_stacked(a2_ptr, offs_c, offs_f, mask_f, RANK, ER, stride_a2e, stride_a2q, stride_a2f, False).to(DOT)
        if ROUTING:
            da2 = tl.zeros((ER_PAD, BLOCK_F), dtype=ACC)
    if SIDE_LORA:
        db = tl.zeros((ER_PAD, BLOCK_F), dtype=ACC)

    for tile in range(pid_s, tl.cdiv(T, BLOCK_T), TOKEN_SPLITS):
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < T
        rows = offs_t.to(tl.int64)
        mask_tf = mask_t[:, None] & mask_f[None, :]
        frozen_offs = rows[:, None] * stride_ft + offs_f[None, :]  # x W1ᵀ, grad_m, x W_gᵀ: contiguous [T, F]
        grad_pre = tl.zeros((BLOCK_T, BLOCK_F), dtype=ACC)
        if SIDE_LORA:
            grad_u_t = tl.zeros((ER_PAD, BLOCK_T), dtype=ACC)
        # A loop, not unrolled: unrolled, the slots' [BT, BF] temporaries are live together and spill.
        for j in range(K_SLOTS):
            p, seg = load_slot(idx_ptr, p_ptr, rows, mask_t, j, stride_it, stride_ij, stride_pt, stride_pj, offs_c,
                               RANK, ER, ACC)
            experts = tl.load(idx_ptr + rows * stride_it + j * stride_ij, mask=mask_t, other=-1)
            seg_t = ((offs_c[:, None] // RANK) == experts[None, :]) & mask_c[:, None]  # [E·r, BT]
            # The slot's inputs are loaded in the slot (L1/L2 hits), not kept live across the slots.
            # fc1's and the gate's pre-activations: inline, not one helper for both (a helper loading its B
            # tile in the slot spilled on sm_80).
            z = tl.load(pre_ptr + frozen_offs, mask=mask_tf, other=0.0)
            if HAS_BIAS:
                z += b1[None, :]
            if HAS_FC1_LORA:
                u = load_tile(u_ptr, rows, offs_c, mask_t, mask_c, stride_ut, stride_uc).to(ACC)
                z, _ = lora_expand(z, u, seg, b1s, scale, DOT, ACC, PRECISION)
            if GATED:
                zg = tl.load(preg_ptr + frozen_offs, mask=mask_tf, other=0.0)
                if HAS_GATE_BIAS:
                    zg += bg[None, :]
                if HAS_GATE_LORA:
                    ug = load_tile(ug_ptr, rows, offs_c, mask_t, mask_c, stride_ut, stride_uc).to(ACC)
                    zg, _ = lora_expand(zg, ug, seg, bgs, scale, DOT, ACC, PRECISION)
                gate, dgate = activation_and_grad(zg, ACTIVATION)
                h = gate * z
            else:
                h, dh = activation_and_grad(z, ACTIVATION)
            grad_m = tl.load(gm_ptr + frozen_offs, mask=mask_tf, other=0.0)
            grad_h = grad_m * p[:, None]
            if HAS_FC2_LORA:
                gb2 = load_tile(gb2_ptr, rows, offs_c, mask_t, mask_c, stride_gbt, stride_gbc).to(ACC)
                grad_v = (tl.where(seg, gb2, 0.0) * (scale * p)[:, None]).to(DOT)
                grad_h += tl.dot(grad_v, a2s, input_precision=PRECISION, out_dtype=ACC)
            if ROUTING:
                dp = tl.sum(h * grad_m, axis=1)
                if HAS_FC2_LORA:
                    hd = h.to(DOT)
                    gb2_t = load_tile(gb2_ptr, offs_c, rows, mask_c, mask_t, stride_gbc, stride_gbt).to(ACC)
                    v_t = tl.dot(a2s, tl.trans(hd), input_precision=PRECISION, out_dtype=ACC)  # (h_j A2ᵀ)ᵀ
                    dp += scale * tl.sum(tl.where(seg_t, v_t * gb2_t, 0.0), axis=0)
                    grad_v_t = (tl.where(seg_t, gb2_t, 0.0) * (scale * p)[None, :]).to(DOT)
                    da2 = tl.dot(grad_v_t, hd, da2, input_precision=PRECISION)
                _store_share(dp_ptr + split_f * stride_dps + rows * stride_dpt + j * stride_dpj, dp, mask_t, ATOMIC)
            if GATED and SIDE == 2:
                grad_z = grad_h * z * dgate
            elif GATED:
                grad_z = grad_h * gate
            else:
                grad_z = grad_h * dh
            grad_pre += grad_z
            if SIDE_LORA:
                if SIDE == 2:
                    bs = bgs
                    u_t = load_tile(ug_ptr, offs_c, rows, mask_c, mask_t, stride_uc, stride_ut).to(ACC)
                else:
                    bs = b1s
                    u_t = load_tile(u_ptr, offs_c, rows, mask_c, mask_t, stride_uc, stride_ut).to(ACC)
                grad_u_t, db = _shrink_grads(grad_z, u_t, bs, seg_t, grad_u_t, db, DOT, ACC, PRECISION)

        tl.store(gpre_ptr + rows[:, None] * stride_gpt + offs_f[None, :] * stride_gpf,
                 grad_pre.to(gpre_ptr.dtype.element_ty), mask=mask_tf)
        if SIDE_LORA:
            _store_share(gu_ptr + split_f * stride_gus + offs_c[:, None] * stride_guc + rows[None, :] * stride_gut,
                         grad_u_t * scale, mask_c[:, None] & mask_t[None, :], ATOMIC)

    # This program's share of the weight gradients, written straight into [E, r, F] / [E, F, r] layout.
    if ROUTING and HAS_FC2_LORA:
        da2_offs = split_t * stride_da2s + factor_offsets(offs_c[:, None], offs_f[None, :], RANK, stride_da2e,
                                                          stride_da2q, stride_da2f)
        _store_share(da2_ptr + da2_offs, da2, mask_cf, ATOMIC)
    if SIDE_LORA:
        db_offs = split_t * stride_dbs + factor_offsets(offs_c[:, None], offs_f[None, :], RANK, stride_dbe,
                                                        stride_dbq, stride_dbf)
        _store_share(db_ptr + db_offs, db * scale, mask_cf, ATOMIC)


# BLOCK_F is the wrapper's (the split buffers have one slice per F tile).  Small token tiles and 8 warps:
# with 4 warps, or 64 tokens, some pass spills on sm_80 or sm_90 (`python -m dasam3 kernels`).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_T": bt}, num_warps=8, num_stages=s) for bt, s in ((16, 1), (32, 1), (32, 2), (16, 2))
]
_tuned = autotuned(_backward_kernel, _GPU_CONFIGS, key=["F", "ER", "GATED", "SIDE"])

# Waves of programs (token splits × F tiles) to aim for: one program per SM fits at a time (registers),
# and more splits cost more split-buffer reduction; two waves balance both.
_TARGET_WAVES = 2


def token_splits(num_tokens: int, f_tiles: int, sm_count: int, min_block_t: int = 64) -> int:
    """How many token splits the backward grid has: as many as fill `_TARGET_WAVES` full waves of
    `sm_count` SMs with `f_tiles` F tiles (rounded down: one program more than the waves hold costs a
    whole extra wave), at most one per token tile, at least one."""
    return max(1, min(triton.cdiv(num_tokens, min_block_t), _TARGET_WAVES * sm_count // f_tiles))


def frozen_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 (fp64 for fp64) result, as the kernels' accumulators hold their products: a
    half-precision GEMM with fp32 output on a GPU (cuBLAS), an fp32 one elsewhere (the interpreter
    multiplies in fp32 anyway).  Rounded to bf16, the recomputed h and the routing gradient drifted past
    the SPEC tolerance in a gated layer."""
    if a.dtype == torch.float64:
        return a @ b
    if a.device.type in ("cuda", "meta") and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _passes(gated: bool) -> list[int]:
    """The backward's launches, by SIDE: a plain FFN in one; a gated one in two, fc1's and the routing
    gradients, then the gate's (both recompute h from x W1ᵀ, x W_gᵀ: one launch doing both sides held
    the state of both and spilled)."""
    return [1, 2] if gated else [1]


def _f_block(d_ff: int) -> int:
    """F tile (the interpreter's is bigger: fewer, larger numpy ops are faster there)."""
    return block(d_ff, 16, 128 if INTERPRET else 64)


@dataclass
class UpProjectionGrads:
    """What the backward kernel produces (reduced): see the module docstring.

    grad_pre: [T, F] in x's dtype, gated [T, 2F] (dL/d pre, then dL/d pre_g); grad_weights: [T, k]
    (without the Σ_j p_j b2 term); grad_u: [T, n·E·r] (scaled by s), fc1's columns then the gate's, those
    of the adapted ones (None when neither is); grad_fc1_B, grad_gate_B: [E, F, r] and grad_fc2_A:
    [E, r, F] (accumulator dtype; None when not adapted).
    """

    grad_pre: torch.Tensor
    grad_weights: torch.Tensor
    grad_u: torch.Tensor | None
    grad_fc1_B: torch.Tensor | None
    grad_fc2_A: torch.Tensor | None
    grad_gate_B: torch.Tensor | None = None


def up_projection_backward(grad_y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                           fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor,
                           fc1_A: torch.Tensor | None, fc1_B: torch.Tensor | None, fc2_A: torch.Tensor | None,
                           fc2_B: torch.Tensor | None, scale: float, activation_name: str,
                           atomic: bool = False, gate: Gate | None = None) -> UpProjectionGrads:
    """Run the frozen GEMMs and the backward kernel, and reduce its split buffers.

    grad_y, x: [T, D]; indices, weights: [T, k]; fc1_weight: [F, D]; fc2_weight: [D, F]; lora factors
    as in `reference.lowrank_moe_reference`; gate: the gate projection of a gated FFN (None: plain).
    """
    T, F = x.shape[0], fc1_weight.shape[0]
    gated = gate is not None
    gate_A, gate_B = (gate.A, gate.B) if gated else (None, None)
    E, R, adapted = lora_layout(fc1_A, fc2_A, gate)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    block_f = _f_block(F)
    f_tiles = triton.cdiv(F, block_f)
    splits = 1 if INTERPRET else token_splits(T, f_tiles, multiprocessor_count(x.device))
    split_f, split_t = (1, 1) if atomic else (f_tiles, splits)
    new = torch.zeros if atomic or T == 0 else torch.empty  # T == 0: no program writes its slice
    opts = {"device": x.device, "dtype": acc_dtype}
    unused = x.new_empty(1, 1, 1, 1, 1)  # stands in for the buffers of a projection that is not adapted

    grad_pre = torch.empty(T, F * (1 + gated), device=x.device, dtype=x.dtype)
    dp = new(split_f, T, indices.shape[1], **opts)
    gu = new(split_f, T, sum(adapted) * E * R, **opts) if any(adapted) else unused[0, 0]
    da2 = new(split_t, E, R, F, **opts) if fc2_A is not None else unused[0]
    db1, dbg = (new(split_t, E, F, R, **opts) if a else unused[0] for a in adapted)
    db_strides = (db1 if adapted[0] else dbg).stride()  # both: [split_t, E, F, R]
    if T > 0:
        # The frozen products on cuBLAS; the stacked shrinks u = x A1ᵀ, u_g = x A_gᵀ and g B2 are [T, E·r]:
        # one small GEMM each, not one per F tile.
        pre = frozen_product(x, fc1_weight.t())
        grad_m = frozen_product(grad_y, fc2_weight)
        pre_g = frozen_product(x, gate.weight.t()) if gated else pre
        shrunk = lora_shrink(x, [fc1_A, gate_A])
        shrunk = unused[0, 0, 0] if shrunk is None else shrunk
        gb2 = grad_y @ stack_up(fc2_B) if fc2_A is not None else unused[0, 0, 0]
        b1, bg, a2 = (t if t is not None else unused[0, 0] for t in (fc1_B, gate_B, fc2_A))
        dot, acc = kernel_dtypes(x.dtype)
        # Below the autotuning size: big token tiles in the interpreter (fewer, larger numpy ops), on a GPU
        # a config of the autotuner's (the static report vouches for those).
        fixed = {"BLOCK_T": block(T, 16, 64), "num_warps": 4, "num_stages": 2} if INTERPRET else \
            _GPU_CONFIGS[1].all_kwargs()
        kernel, config = pick_kernel(_backward_kernel, None if atomic else _tuned, T, fixed)
        common = (pre, grad_m, pre_g, indices, weights, *lora_columns(shrunk, adapted, E * R), b1, bg, a2, gb2)
        gu_fc1, gu_gate = lora_columns(gu, adapted, E * R)
        outputs = {1: (grad_pre[:, :F], gu_fc1, db1), 2: (grad_pre[:, F:], gu_gate, dbg)}  # by SIDE
        for side in _passes(gated):
            side_pre, side_gu, side_db = outputs[side]
            launch(
                kernel, (f_tiles, splits),
                *common, side_pre, dp, side_gu, da2, side_db,
                T, F, E * R, float(scale), splits, fc1_bias if fc1_bias is not None else pre,
                gate.bias if gated and gate.bias is not None else pre,
                pre.stride(0), *indices.stride(), *weights.stride(), *shrunk.stride(),
                b1.stride(0), b1.stride(2), b1.stride(1), bg.stride(0), bg.stride(2), bg.stride(1), *a2.stride(),
                *gb2.stride(), *grad_pre.stride(), *dp.stride(), *gu.stride(), *da2.stride(),
                db_strides[0], db_strides[1], db_strides[3], db_strides[2],
                K_SLOTS=indices.shape[1], HAS_BIAS=fc1_bias is not None, GATED=gated,
                HAS_GATE_BIAS=gated and gate.bias is not None, HAS_FC1_LORA=adapted[0], HAS_GATE_LORA=adapted[1],
                HAS_FC2_LORA=fc2_A is not None, SIDE=side, ACTIVATION=activation_name,
                ATOMIC=atomic, DOT=dot, ACC=acc, PRECISION=dot_precision(x.dtype), RANK=R,
                ER_PAD=stacked_width(E, R), BLOCK_F=block_f, **config,
            )

    def reduce(buffer: torch.Tensor, adapted: bool) -> torch.Tensor | None:
        return None if not adapted else buffer[0] if atomic else buffer.sum(0)

    return UpProjectionGrads(grad_pre, reduce(dp, True), reduce(gu, any(adapted)), reduce(db1, adapted[0]),
                             reduce(da2, fc2_A is not None), reduce(dbg, adapted[1]))

"""Fused router: logits, per-sample context bias, top-k, top-k softmax and full softmax in one launch.

Forward, per tile of tokens (fp32 throughout, as `routing.route`; fp16/bf16 x and W are multiplied on
tensor cores with fp32 accumulation, which is the same fp32 arithmetic: their products are exact in fp32):

    l_t   = x_t Wᵀ + b + ctx_bias[t // (T / R)]      (the context term arrives projected, once per sample)
    e_t   = top-k of l_t, descending (ties: the lower expert index first; NaN ranks above every number,
            as in torch.topk, so a NaN logit is picked and its weights come out NaN, never dropped)
    w_t   = softmax(l_t[e_t]);   probs_t = softmax(l_t)

Backward, per tile of tokens × tile of D: the logit gradient through both softmaxes,
`dl = probs ⊙ (gp − ⟨probs, gp⟩) + scatter_e(w ⊙ (gw − ⟨w, gw⟩))`, and `dx = dl W`.  The reductions
over tokens (dW = dlᵀ x, db, the per-sample context gradient) are small GEMMs left to PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import INTERPRET, block, kernel_dtypes, launch


@triton.jit
def _router_forward_kernel(
    x_ptr, w_ptr, b_ptr, c_ptr, idx_ptr, wout_ptr, probs_ptr,
    T, D, E, TOKENS_PER_ROW,
    stride_xt, stride_xd, stride_we, stride_wd, stride_cr, stride_ce,
    K_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CONTEXT: tl.constexpr, DOT: tl.constexpr,
    E_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, K_PAD)
    mask_t = offs_t < T
    mask_e = offs_e < E
    rows = offs_t.to(tl.int64)

    logits = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < D
        xk = tl.load(x_ptr + rows[:, None] * stride_xt + kk[None, :] * stride_xd,
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0).to(DOT)
        wk = tl.load(w_ptr + offs_e[None, :] * stride_we + kk[:, None] * stride_wd,
                     mask=mask_k[:, None] & mask_e[None, :], other=0.0).to(DOT)
        logits = tl.dot(xk, wk, logits, input_precision="ieee")
    if HAS_BIAS:
        logits += tl.load(b_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    if HAS_CONTEXT:
        sample = (offs_t // TOKENS_PER_ROW).to(tl.int64)
        logits += tl.load(c_ptr + sample[:, None] * stride_cr + offs_e[None, :] * stride_ce,
                          mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
    logits = tl.where(mask_e[None, :], logits, float("-inf"))

    row_max = tl.max(logits, axis=1)
    exp_all = tl.exp(logits - row_max[:, None])
    probs = exp_all / tl.sum(exp_all, axis=1)[:, None]

    # Top-k by repeated arg-max over the logits with NaN as +inf (torch.topk's order: a NaN is never
    # matched by `== best`, so it would pick no expert at all); the exponent takes the picked logit
    # itself, so a NaN one makes the weights NaN as torch's softmax does.
    remaining = tl.where(logits != logits, float("inf"), logits)
    chosen = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    top_exp = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    for j in tl.static_range(K_SLOTS):
        best = tl.max(remaining, axis=1)
        pick = tl.min(tl.where(remaining == best[:, None], offs_e[None, :], E_PAD), axis=1)
        picked = offs_e[None, :] == pick[:, None]
        logit = tl.sum(tl.where(picked, logits, 0.0), axis=1)
        chosen = tl.where(offs_j[None, :] == j, pick.to(tl.int64)[:, None], chosen)
        top_exp = tl.where(offs_j[None, :] == j, tl.exp(logit - row_max)[:, None], top_exp)
        remaining = tl.where(picked, float("-inf"), remaining)
    top_w = top_exp / tl.sum(top_exp, axis=1)[:, None]

    mask_tj = mask_t[:, None] & (offs_j[None, :] < K_SLOTS)
    tl.store(idx_ptr + rows[:, None] * K_SLOTS + offs_j[None, :], chosen, mask=mask_tj)
    tl.store(wout_ptr + rows[:, None] * K_SLOTS + offs_j[None, :], top_w, mask=mask_tj)
    tl.store(probs_ptr + rows[:, None] * E + offs_e[None, :], probs, mask=mask_t[:, None] & mask_e[None, :])


@triton.jit
def _router_backward_kernel(
    gw_ptr, gp_ptr, idx_ptr, w_ptr, probs_ptr, weight_ptr, dl_ptr, dx_ptr,
    T, D, E,
    stride_gwt, stride_gwj, stride_gpt, stride_gpe, stride_we, stride_wd, stride_dxt, stride_dxd,
    K_SLOTS: tl.constexpr, DOT: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, E_PAD)
    offs_j = tl.arange(0, K_PAD)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_te = mask_t[:, None] & (offs_e[None, :] < E)
    mask_tj = mask_t[:, None] & (offs_j[None, :] < K_SLOTS)
    rows = offs_t.to(tl.int64)

    probs = tl.load(probs_ptr + rows[:, None] * E + offs_e[None, :], mask=mask_te, other=0.0)
    grad_probs = tl.load(gp_ptr + rows[:, None] * stride_gpt + offs_e[None, :] * stride_gpe, mask=mask_te,
                         other=0.0).to(tl.float32)
    dl = probs * (grad_probs - tl.sum(probs * grad_probs, axis=1)[:, None])

    top_w = tl.load(w_ptr + rows[:, None] * K_SLOTS + offs_j[None, :], mask=mask_tj, other=0.0)
    grad_w = tl.load(gw_ptr + rows[:, None] * stride_gwt + offs_j[None, :] * stride_gwj, mask=mask_tj,
                     other=0.0).to(tl.float32)
    grad_top = top_w * (grad_w - tl.sum(top_w * grad_w, axis=1)[:, None])  # [BT, K_PAD]
    for j in tl.static_range(K_SLOTS):
        expert = tl.load(idx_ptr + rows * K_SLOTS + j, mask=mask_t, other=-1)
        grad_j = tl.sum(tl.where(offs_j[None, :] == j, grad_top, 0.0), axis=1)
        dl += tl.where(offs_e[None, :] == expert[:, None], grad_j[:, None], 0.0)

    if pid_d == 0:
        tl.store(dl_ptr + rows[:, None] * E + offs_e[None, :], dl, mask=mask_te)
    weight = tl.load(weight_ptr + offs_e[:, None] * stride_we + offs_d[None, :] * stride_wd,
                     mask=(offs_e[:, None] < E) & (offs_d[None, :] < D), other=0.0).to(DOT)
    dx = tl.dot(dl.to(DOT), weight, input_precision="ieee", out_dtype=tl.float32)
    tl.store(dx_ptr + rows[:, None] * stride_dxt + offs_d[None, :] * stride_dxd, dx.to(dx_ptr.dtype.element_ty),
             mask=mask_t[:, None] & (offs_d[None, :] < D))


def _dot_dtype(x: torch.Tensor, weight: torch.Tensor):
    """The router's operand dtype: x's half type when the weight has it too (tensor cores), else fp32."""
    dot, _ = kernel_dtypes(x.dtype)
    return dot if x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16) else tl.float32


def _blocks(num_tokens: int, width: int, top_k: int, num_experts: int) -> dict:
    return {"E_PAD": block(num_experts, 16, 1 << 20), "K_PAD": block(top_k, 1, 1 << 20),
            "BLOCK_T": block(num_tokens, 16, 128 if INTERPRET else 64),
            "BLOCK_K": block(width, 16, 128 if INTERPRET else 64)}


def route_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ctx_bias: torch.Tensor | None,
                  top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(indices [T, k] int64, weights [T, k] fp32, probs [T, E] fp32)`, as `routing.route`.

    x: [T, D]; weight: [E, D]; bias: [E]; ctx_bias: [R, E] with R dividing T (row t // (T / R)).
    """
    T, D = x.shape
    E = weight.shape[0]
    indices = torch.empty(T, top_k, device=x.device, dtype=torch.int64)
    weights = torch.empty(T, top_k, device=x.device, dtype=torch.float32)
    probs = torch.empty(T, E, device=x.device, dtype=torch.float32)
    if T == 0:
        return indices, weights, probs
    blocks = _blocks(T, D, top_k, E)
    ctx = ctx_bias if ctx_bias is not None else probs
    launch(
        _router_forward_kernel, (triton.cdiv(T, blocks["BLOCK_T"]),),
        x, weight, bias if bias is not None else weight, ctx, indices, weights, probs,
        T, D, E, T // ctx.shape[0],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), ctx.stride(0), ctx.stride(1),
        K_SLOTS=top_k, HAS_BIAS=bias is not None, HAS_CONTEXT=ctx_bias is not None, DOT=_dot_dtype(x, weight),
        **blocks,
    )
    return indices, weights, probs


def route_backward(grad_weights: torch.Tensor, grad_probs: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   indices: torch.Tensor, weights: torch.Tensor,
                   probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(grad_logits [T, E] fp32, grad_x [T, D] in x's dtype)` from the gradients of the router's outputs."""
    T, D = x.shape
    E = weight.shape[0]
    grad_logits = torch.empty(T, E, device=x.device, dtype=torch.float32)
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if T == 0:
        return grad_logits, grad_x
    blocks = _blocks(T, D, indices.shape[1], E)
    block_d = blocks.pop("BLOCK_K")
    grid = (triton.cdiv(T, blocks["BLOCK_T"]), triton.cdiv(D, block_d))
    launch(
        _router_backward_kernel, grid,
        grad_weights, grad_probs, indices.contiguous(), weights.contiguous(), probs.contiguous(), weight,
        grad_logits, grad_x, T, D, E,
        grad_weights.stride(0), grad_weights.stride(1), grad_probs.stride(0), grad_probs.stride(1),
        weight.stride(0), weight.stride(1), grad_x.stride(0), grad_x.stride(1),
        K_SLOTS=indices.shape[1], DOT=_dot_dtype(x, weight), BLOCK_D=block_d, **blocks,
    )
    return grad_logits, grad_x

"""Top-k routing in plain PyTorch: the oracle for the fused router kernels and the default path.

Routing decisions are made in fp32 (fp64 stays fp64) whatever the activations' dtype, as Switch
Transformer and Mixtral do: bf16 logits tie often enough to flip experts between two otherwise equal
implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_context_bias(ctx_bias: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Broadcast per-sample router biases to tokens.

    ctx_bias: [R, E] with R dividing T; token t uses row t // (T // R).  Returns [T, E].
    """
    rows = check_context_rows(ctx_bias.shape[0], num_tokens)
    return ctx_bias if rows == num_tokens else ctx_bias.repeat_interleave(num_tokens // rows, dim=0)


def check_context_rows(rows: int, num_tokens: int) -> int:
    """ValueError unless `rows` per-sample context rows divide `num_tokens` (or equal it); returns rows."""
    if rows != num_tokens and (rows == 0 or num_tokens % rows):
        raise ValueError(f"context bias rows must divide the number of tokens {num_tokens}, got {rows}")
    return rows


def router_logits(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ctx_bias: torch.Tensor | None,
) -> torch.Tensor:
    """`l = x Wᵀ + b + ctx_bias[sample(t)]` in fp32 (fp64 stays fp64).  x: [T, D], weight: [E, D] → [T, E]."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    logits = F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if ctx_bias is not None:
        logits = logits + expand_context_bias(ctx_bias.to(dtype), x.shape[0])
    return logits


def route(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ctx_bias: torch.Tensor | None,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing.

    Returns `indices [T, k]` (int64, descending logit), `weights [T, k]` (softmax over the selected
    logits, fp32) and `probs [T, E]` (softmax over all experts, fp32, for the auxiliary losses).
    """
    logits = router_logits(x, weight, bias, ctx_bias)
    top_logits, indices = logits.topk(top_k, dim=-1)
    return indices, top_logits.softmax(dim=-1), logits.softmax(dim=-1)


def random_route(
    num_tokens: int, num_experts: int, top_k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k distinct experts drawn uniformly per token, each weighted 1/k (the "w/o DER" ablation)."""
    indices = torch.rand(num_tokens, num_experts, device=device).argsort(dim=-1)[:, :top_k]
    weights = torch.full((num_tokens, top_k), 1.0 / top_k, device=device)
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts, device=device)
    return indices, weights, probs


def aux_losses(indices: torch.Tensor, probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The balance and sparsity losses of SPEC section 1.

    balance = E · Σ_j Σ_i f_j,i · P_i  (f_j,i: share of tokens whose j-th choice is i; P_i: mean prob)
    sparse  = mean_t entropy(probs_t)
    """
    num_experts = probs.shape[-1]
    if probs.shape[0] == 0:
        zero = probs.sum()
        return {"balance": zero, "sparse": zero}
    choice_share = F.one_hot(indices, num_experts).to(probs.dtype).mean(dim=0)  # [k, E]
    mean_prob = probs.mean(dim=0)  # [E]
    balance = num_experts * (choice_share * mean_prob).sum()
    entropy = -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)
    return {"balance": balance, "sparse": entropy.mean()}

"""The concept signals of the fusion layers: the ConceptContext that feeds the Dynamic Expert Router its
per-image global signal, and the "Concat" baseline's ConceptConcat."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConceptContext(nn.Module):
    """`context = [CrossAttn(proj(e_c), AdaptiveAvgPool(V, pool)) ; stopgrad(e_c)]`.

    e_c: [B, text_dim] concept embedding; V: [B, H, W, d_model] visual tokens.
    Returns [B, d_model + text_dim].  The visual tokens are pooled to a grid (not one vector: attention
    over a single key ignores its query), and the raw concept embedding is passed on detached.
    """

    def __init__(self, d_model: int, text_dim: int, pool: tuple[int, int] = (4, 4), num_heads: int = 8,
                 device=None, dtype=None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"num_heads must divide d_model={d_model}, got num_heads={num_heads}")
        if len(pool) != 2 or min(pool) < 1:
            raise ValueError(f"pool must be a (height, width) pair of positive ints, got {pool!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.text_dim, self.pool = d_model, text_dim, tuple(pool)
        self.query_proj = nn.Linear(text_dim, d_model, **factory)
        self.attn = nn.MultiheadAttention(d_model, num_heads, batch_first=True, **factory)

    @property
    def out_dim(self) -> int:
        return self.d_model + self.text_dim

    def forward(self, concept: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        if concept.dim() != 2 or concept.shape[1] != self.text_dim:
            raise ValueError(f"concept must be [B, {self.text_dim}], got shape {tuple(concept.shape)}")
        if visual.dim() != 4 or visual.shape[-1] != self.d_model or visual.shape[0] != concept.shape[0]:
            raise ValueError(
                f"visual must be [B={concept.shape[0]}, H, W, {self.d_model}], got shape {tuple(visual.shape)}"
            )
        grid = F.adaptive_avg_pool2d(visual.permute(0, 3, 1, 2), self.pool)  # [B, D, ph, pw]
        keys = grid.flatten(2).transpose(1, 2)  # [B, ph·pw, D]
        query = self.query_proj(concept).unsqueeze(1)  # [B, 1, D]
        attended, _ = self.attn(query, keys, keys, need_weights=False)
        return torch.cat([attended.squeeze(1), concept.detach()], dim=-1)


class ConceptConcat(nn.Module):
    """The "Concat" baseline: `Linear([x ; e_c])`, initialised to the identity on x (zeros on e_c)."""

    def __init__(self, d_model: int, text_dim: int):
        super().__init__()
        self.proj = nn.Linear(d_model + text_dim, d_model)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.weight[:, :d_model].copy_(torch.eye(d_model))
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
        """x: [P, S, d], concept: [P, Dt] → [P, S, d]."""
        return self.proj(torch.cat([x, concept.unsqueeze(1).expand(-1, x.shape[1], -1)], dim=-1))

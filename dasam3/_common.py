"""Small helpers shared across dasam3's modules."""

from __future__ import annotations

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    """ "auto" → the GPU when there is one, else the CPU; any other name as torch reads it ("cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def factory_of(module: nn.Module) -> dict:
    """`device` and `dtype` keywords matching the module's first parameter (for modules added beside it)."""
    param = next(module.parameters())
    return {"device": param.device, "dtype": param.dtype}


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """values [B, S, D], valid [B, S] (nonzero = a real token) or None (all are) → [B, D]: the mean of each
    row's valid tokens (zeros for a row with none)."""
    if valid is None:
        return values.mean(dim=1)
    weights = valid.to(values.dtype).unsqueeze(-1)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

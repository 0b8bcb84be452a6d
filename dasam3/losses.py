"""The segmentation loss of SPEC section 3: Dice + Focal on per-concept sigmoid masks.

Both terms follow MONAI's `DiceFocalLoss(sigmoid=True)` exactly (smoothing 1e-5, Dice averaged over
samples and concepts, Focal with gamma = 2 averaged over every pixel), so numbers are comparable with
MONAI-trained baselines; the routing terms come from `dasam3.layers.aux_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.shape != targets.shape:
        raise ValueError(f"logits and targets must have the same shape [B, K, H, W], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 − soft Dice per (sample, concept), averaged.  logits, targets: [B, K, ...]."""
    _check(logits, targets)
    probs = torch.sigmoid(logits.float()).flatten(2)
    targets = targets.float().flatten(2)
    overlap = (probs * targets).sum(-1)
    total = probs.sum(-1) + targets.sum(-1)
    return (1.0 - (2.0 * overlap + smooth) / (total + smooth)).mean()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss `(1 − p_t)^γ · BCE`, averaged over every element.  logits, targets: [B, K, ...]."""
    _check(logits, targets)
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # (1 − p_t)^γ computed in log space: stable for large |logits|
    modulator = torch.exp(gamma * F.logsigmoid(-logits * (2.0 * targets - 1.0)))
    return (modulator * bce).mean()


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice + Focal (sigmoid, per concept).  logits, targets: [B, K, H, W]."""
    return dice_loss(logits, targets) + focal_loss(logits, targets)

"""The FFN activations the layer supports, with their derivatives.

The derivatives are written out (not taken from autograd) because the fused paths recompute the
activation in their backward pass from the saved pre-activation.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "quick_gelu")

# quick_gelu(z) = z · sigmoid(1.702 z): CLIP's (and SAM3's text towers') cheap GELU approximation.
QUICK_GELU_SLOPE = 1.702

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation as a function of the pre-activation."""
    check_activation(name)
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda z: F.gelu(z, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "quick_gelu":
        return lambda z: z * torch.sigmoid(QUICK_GELU_SLOPE * z)
    return F.silu


def activation_and_grad(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(act(z), act'(z))`, elementwise, in z's dtype."""
    check_activation(name)
    if name == "relu":
        return F.relu(z), (z > 0).to(z.dtype)
    if name in ("silu", "quick_gelu"):  # z σ(cz): derivative σ(cz) (1 + c z (1 − σ(cz))), c = 1 for silu
        slope = QUICK_GELU_SLOPE if name == "quick_gelu" else 1.0
        sig = torch.sigmoid(slope * z)
        return z * sig, sig * (1 + slope * z * (1 - sig))
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return z * cdf, cdf + z * pdf
    inner = _SQRT_2_OVER_PI * (z + 0.044715 * z.pow(3))
    tanh = torch.tanh(inner)
    dinner = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
    return 0.5 * z * (1 + tanh), 0.5 * (1 + tanh) + 0.5 * z * (1 - tanh * tanh) * dinner

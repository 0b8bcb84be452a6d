"""Kernels of the DA-MoE layer: the reference loop, the PyTorch fast path, the fused Triton and C++/CUDA
kernels, and the registry that picks one (`resolve_backend`)."""

from .activations import ACTIVATIONS
from .backends import BACKENDS, Backend, available_backends, load_backend, resolve_backend
from .reference import full_moe_reference, gated_moe_reference, lowrank_moe_reference
from .routing import aux_losses, random_route, route

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "Backend",
    "available_backends",
    "aux_losses",
    "full_moe_reference",
    "gated_moe_reference",
    "load_backend",
    "lowrank_moe_reference",
    "random_route",
    "resolve_backend",
    "route",
]

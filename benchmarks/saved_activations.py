"""Activation memory autograd saves for backward: the fused Triton op and the whole DAMoE layer against a
dense FFN (Linear → GELU → Linear, frozen weights, gradient for x only), at SAM3's FFN shape.

    TRITON_INTERPRET=1 python benchmarks/saved_activations.py                  # CPU, Triton interpreter
    python benchmarks/saved_activations.py --device cuda --dtype bf16

Counts every distinct storage that autograd saves while the forward runs (`saved_tensors_hooks`),
except the parameters' (frozen W0, lora factors and router weights are not activations).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dasam3.layers import DAMoE
from dasam3_kernels import load_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Saved:
    """What one forward saved: (shape, dtype, bytes) per distinct non-parameter storage."""

    tensors: list[tuple[tuple[int, ...], torch.dtype, int]]

    @property
    def bytes(self) -> int:
        return sum(size for _, _, size in self.tensors)


def saved_activations(forward: Callable[[], object], parameters) -> Saved:
    """The distinct non-parameter storages autograd saves while `forward` runs."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, tuple[tuple[int, ...], torch.dtype, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen.setdefault(storage.data_ptr(), (tuple(tensor.shape), tensor.dtype, storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return Saved(list(seen.values()))


def measure(tokens: int, d_model: int, d_ff: int, experts: int, top_k: int, rank: int, dtype: torch.dtype,
            device: str) -> dict[str, Saved]:
    """Saved activations of the dense FFN, the fused op alone and the DAMoE layer (backend "triton",
    training mode: router, aux losses and experts) on the same input."""
    torch.manual_seed(0)
    layer = DAMoE(d_model, d_ff, num_experts=experts, top_k=top_k, rank=rank, backend="triton", device=device,
                  dtype=dtype).train()
    x = torch.randn(tokens, d_model, device=device, dtype=dtype, requires_grad=True)
    params = list(layer.parameters())
    router = layer.router.token_proj
    with torch.no_grad():
        indices, weights, _ = load_backend("triton").route(x, router.weight, router.bias, None, top_k)
    weights.requires_grad_()
    lora = [getattr(layer, f"{n}_lora_{f}") for n in ("fc1", "fc2") for f in ("A", "B")]
    frozen = [layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias]
    op = load_backend("triton").lowrank_moe
    return {
        "dense": saved_activations(lambda: layer.fc2(F.gelu(layer.fc1(x))), params),
        "op": saved_activations(lambda: op(x, indices, weights, *frozen, *lora, layer.scale, layer.activation), params),
        "layer": saved_activations(lambda: layer(x), params),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    results = measure(args.tokens, args.d_model, args.d_ff, args.experts, args.top_k, args.rank, DTYPES[args.dtype],
                      args.device)
    dense = results["dense"].bytes
    print(f"T={args.tokens} D={args.d_model} F={args.d_ff} E={args.experts} k={args.top_k} r={args.rank} {args.dtype}")
    for name, saved in results.items():
        print(f"{name:>6}: {saved.bytes / 2**20:8.3f} MiB = {saved.bytes / dense:.3f} x dense")
        for shape, dtype, size in saved.tensors:
            print(f"          {str(list(shape)):>14} {str(dtype):>15} {size / 2**20:8.3f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side-by-side timings of the compiled kernels against a dense FFN of the same frozen weights.

    python benchmarks/bench_cpu_kernel.py [--repeats 15] [--backends cpu torch] [--shape 4 1024 256 2048]
    python benchmarks/bench_cpu_kernel.py --device cuda --dtype float16      # the CUDA kernels, on a GPU

The dense baseline is `F.linear -> act -> F.linear` with W0; its training step differentiates x only
(the FFN is frozen).  A DA-MoE training step differentiates x, every lora factor and the routing
weights.  Everything is in `--dtype` (bf16 weights and input: the half-type path of the kernels).
Each measurement is the median of `--repeats` runs, the candidates interleaved run by run so that
load from other processes hits them alike.  Goals (issue 12, SAM3's shape, CPU, the fused kernel):
fp32 forward <= 1.05x dense, training step <= 1.3x; bf16 forward <= 1.15x, training step <= 1.5x.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F

from dasam3.benchmark import hardware_name, interleaved_medians, isa_description
from dasam3_kernels import available_backends, load_backend
from dasam3_kernels.activations import activation_fn

GOALS = {(torch.float32, "forward"): 1.05, (torch.float32, "training"): 1.3,
         (torch.bfloat16, "forward"): 1.15, (torch.bfloat16, "training"): 1.5}


def make_inputs(batch: int, seq: int, d_model: int, d_ff: int, experts: int, top_k: int, rank: int, seed: int = 0):
    """SAM3-shaped inputs on the CPU in fp32: x [batch·seq, D], a learned-router-like skewed top-k (fp32
    routing weights), non-zero lora factors."""
    gen = torch.Generator().manual_seed(seed)
    tokens = batch * seq
    x = torch.randn(tokens, d_model, generator=gen)
    logits = torch.randn(tokens, experts, generator=gen) + torch.linspace(0, 1, experts)
    top, indices = logits.topk(top_k, dim=-1)
    frozen = {
        "fc1_weight": torch.randn(d_ff, d_model, generator=gen) * d_model**-0.5,
        "fc1_bias": torch.randn(d_ff, generator=gen) * 0.1,
        "fc2_weight": torch.randn(d_model, d_ff, generator=gen) * d_ff**-0.5,
        "fc2_bias": torch.randn(d_model, generator=gen) * 0.1,
    }
    lora = {
        "fc1_A": torch.randn(experts, rank, d_model, generator=gen) * d_model**-0.5,
        "fc1_B": torch.randn(experts, d_ff, rank, generator=gen) * 0.01,
        "fc2_A": torch.randn(experts, rank, d_ff, generator=gen) * d_ff**-0.5,
        "fc2_B": torch.randn(experts, d_model, rank, generator=gen) * 0.01,
    }
    return x, indices, top.softmax(-1), frozen, lora


def dense_step(x, frozen, activation: str, train: bool) -> Callable[[], None]:
    act = activation_fn(activation)
    x = x.detach().requires_grad_(train)

    def run():
        with torch.set_grad_enabled(train):
            y = F.linear(act(F.linear(x, frozen["fc1_weight"], frozen["fc1_bias"])), frozen["fc2_weight"],
                         frozen["fc2_bias"])
            if train:
                y.backward(torch.ones_like(y))

    return run


def moe_step(backend: str, x, indices, weights, frozen, lora, activation: str, train: bool) -> Callable[[], None]:
    op = load_backend(backend).lowrank_moe
    x = x.detach().requires_grad_(train)
    weights = weights.detach().requires_grad_(train)
    lora = {name: t.detach().requires_grad_(train) for name, t in lora.items()}

    def run():
        with torch.set_grad_enabled(train):
            y = op(x, indices, weights, *frozen.values(), *lora.values(), 1.0, activation)
            if train:
                y.backward(torch.ones_like(y))

    return run


def _to(tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: t.to(device, dtype) for name, t in tensors.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backends", nargs="+", help="default: the device's compiled backend and torch")
    parser.add_argument("--shape", nargs=4, type=int, default=(4, 1024, 256, 2048), metavar=("B", "N", "D", "F"))
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--activations", nargs="+", default=["gelu", "relu"])
    parser.add_argument("--threads", type=int, nargs="+", help="CPU thread counts, a table each (default: current)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = args.backends or [b for b in (args.device, "torch") if b in available_backends(device)]
    issue_shape = (device.type == "cpu" and tuple(args.shape) == (4, 1024, 256, 2048)
                   and (args.experts, args.top_k, args.rank) == (4, 2, 8))  # where the goals are set

    batch, seq, d_model, d_ff = args.shape
    x, indices, weights, frozen, lora = make_inputs(batch, seq, d_model, d_ff, args.experts, args.top_k, args.rank)
    x, frozen, lora = x.to(device, dtype), _to(frozen, device, dtype), _to(lora, device, dtype)
    indices, weights = indices.to(device), weights.to(device)
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        where = hardware_name(device) + (f", {threads} threads; {isa_description(device)}"
                                         if device.type == "cpu" else "")
        print(f"x [{batch}, {seq}, {d_model}] (T = {batch * seq}), F = {d_ff}, E = {args.experts}, k = {args.top_k}, "
              f"r = {args.rank}, {args.dtype}, {where}, median of {args.repeats}")
        print_table(x, indices, weights, frozen, lora, backends, args, GOALS if issue_shape else {})


def print_table(x, indices, weights, frozen, lora, backends: list[str], args, goals: dict) -> None:
    print(f"{'step':<9} {'act':<5} {'dense ms':>9} " + " ".join(f"{b + ' ms':>9} {'ratio':>6}" for b in backends)
          + "   goal")
    for train in (False, True):
        step = "training" if train else "forward"
        for activation in args.activations:
            candidates = {"dense": dense_step(x, frozen, activation, train)}
            for b in backends:
                candidates[b] = moe_step(b, x, indices, weights, frozen, lora, activation, train)
            ms = interleaved_medians(candidates, min_run_time=0.0, min_repeats=args.repeats)
            cells = " ".join(f"{ms[b]:9.1f} {ms[b] / ms['dense']:5.2f}x" for b in backends)
            goal = goals.get((x.dtype, step))
            print(f"{step:<9} {activation:<5} {ms['dense']:9.1f} {cells}   {f'<= {goal}x' if goal else ''}")

if __name__ == "__main__":
    main()

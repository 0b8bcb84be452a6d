"""GPU benchmark of the DA-MoE layer: a dense cuBLAS FFN against the torch path, a standard MoE (full
experts) and the fused Triton path, forward and training step, written as JSON.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Defaults are the issue's shape (T = 16384, D = 256, F = 2048, E = 4, k = 2, r = 8, bf16).  Every
variant is timed twice: `eager` (triton.testing.do_bench: median ms of back-to-back calls, the CPU's
launch overhead included where it is not hidden) and `graph` (do_bench_cudagraph: the same calls
replayed from a CUDA graph, i.e. GPU time only; null where a variant cannot be captured).  The
training step is forward + backward with gradients for x and every trainable parameter (lora
factors and router for the MoE variants; x alone for the frozen dense FFN).  `ops` times the expert
ops alone on one fixed routing (the router and aux losses left out).

`--device cpu` (with TRITON_INTERPRET=1 and small shapes) is a smoke test of this script, not a
measurement: plain wall-clock medians, no graphs, no memory figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from dasam3.benchmark import hardware_name
from dasam3.io import write_text
from dasam3.layers import DAMoE
from dasam3_kernels import available_backends, load_backend, resolve_backend, routing
from dasam3_kernels.activations import activation_fn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORWARD, TRAIN = "forward_ms", "train_step_ms"
GOALS = {"triton_forward_vs_dense": 1.15, "triton_train_vs_dense": 1.35, "torch_vs_triton_forward": 2.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--activations", nargs="+", default=["gelu", "relu"],
                        help="gelu: the layer's default; relu: SAM3's fusion-encoder FFN")
    parser.add_argument("--tests-exit-code", type=int, default=None, help="recorded in the JSON (gpu_check.sh)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: smoke test only")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write (must not exist)")
    return parser.parse_args(argv)


def _bench(fn: Callable[[], object], graph: bool) -> float | None:
    import triton.testing

    if not torch.cuda.is_available():  # smoke test: wall clock, no graphs
        if graph:
            return None
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[1]
    try:
        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except Exception as error:  # noqa: BLE001  (a variant that cannot be captured is reported, not fatal)
        print(f"  ({'graph' if graph else 'eager'} timing failed: {type(error).__name__}: {error})", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def _timed(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad_out: torch.Tensor,
           module: torch.nn.Module | None = None) -> dict:
    """Forward (no grad, eval mode) and training-step timings, and the step's extra peak memory."""
    def train_step():
        if module is not None:
            module.train(True)
        return torch.autograd.grad(forward(), leaves, grad_out)

    def infer():
        if module is not None:
            module.train(False)
        with torch.no_grad():
            return forward()

    train_step(), infer()  # compile, autotune
    out = {}
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step()
        torch.cuda.synchronize()
        out["train_step_peak_extra_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    for mode in ("eager", "graph"):
        out[mode] = {FORWARD: _bench(infer, mode == "graph"), TRAIN: _bench(train_step, mode == "graph")}
    return out


def _layer(args, activation: str, backend: str, expert_type: str, device, dtype) -> DAMoE:
    torch.manual_seed(0)
    layer = DAMoE(args.d_model, args.d_ff, num_experts=args.experts, top_k=args.top_k, rank=args.rank,
                  activation=activation, expert_type=expert_type, backend=backend, device=device, dtype=dtype)
    if expert_type == "lowrank":
        with torch.no_grad():  # non-zero B factors, as after training (the kernels' cost does not depend on it)
            for param in layer.expert_parameters():
                param.normal_(std=param.shape[-1] ** -0.5)
    return layer


def _layer_variants(args, activation, x, grad_out) -> dict:
    device, dtype = x.device, x.dtype
    results = {}
    fc1 = torch.nn.Linear(args.d_model, args.d_ff, device=device, dtype=dtype).requires_grad_(False)
    fc2 = torch.nn.Linear(args.d_ff, args.d_model, device=device, dtype=dtype).requires_grad_(False)
    act = activation_fn(activation)
    print(f"[{activation}] dense", flush=True)
    results["dense"] = _timed(lambda: fc2(act(fc1(x))), [x], grad_out)
    variants = {"torch": ("torch", "lowrank"), "standard_moe": ("auto", "full"), "triton": ("triton", "lowrank")}
    for name, (backend, expert_type) in variants.items():
        print(f"[{activation}] {name}", flush=True)
        try:
            layer = _layer(args, activation, backend, expert_type, device, dtype)
        except (RuntimeError, ValueError) as error:
            results[name] = {"error": str(error)}
            continue
        leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]
        results[name] = _timed(lambda layer=layer: layer(x), leaves, grad_out, module=layer)
        results[name]["backend"] = layer.backend if backend != "auto" else \
            resolve_backend("auto", x.device, full_experts=expert_type == "full").name
    return results


def _op_variants(args, activation, x, grad_out) -> dict:
    """The expert ops alone (fixed routing): the torch path against the fused kernels."""
    layer = _layer(args, activation, "torch", "lowrank", x.device, x.dtype)
    with torch.no_grad():
        indices, weights, _ = routing.route(x, layer.router.token_proj.weight, layer.router.token_proj.bias, None,
                                            args.top_k)
    weights.requires_grad_()
    lora = [layer.fc1_lora_A, layer.fc1_lora_B, layer.fc2_lora_A, layer.fc2_lora_B]
    frozen = [layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias]
    results = {}
    for name in ("torch", "triton"):
        op = load_backend(name).lowrank_moe
        print(f"[{activation}] op {name}", flush=True)
        results[name] = _timed(lambda op=op: op(x, indices, weights, *frozen, *lora, layer.scale, activation),
                               [x, weights, *lora], grad_out)
    return results


# name: (numerator, denominator), each (table, variant, timing).
RATIOS = {
    "triton_forward_vs_dense": (("layers", "triton", FORWARD), ("layers", "dense", FORWARD)),
    "triton_train_vs_dense": (("layers", "triton", TRAIN), ("layers", "dense", TRAIN)),
    "torch_vs_triton_forward": (("layers", "torch", FORWARD), ("layers", "triton", FORWARD)),
    "torch_vs_triton_train": (("layers", "torch", TRAIN), ("layers", "triton", TRAIN)),
    "standard_moe_vs_triton_train": (("layers", "standard_moe", TRAIN), ("layers", "triton", TRAIN)),
    "op_triton_forward_vs_dense": (("ops", "triton", FORWARD), ("layers", "dense", FORWARD)),
    "op_triton_train_vs_dense": (("ops", "triton", TRAIN), ("layers", "dense", TRAIN)),
    "op_torch_vs_triton_forward": (("ops", "torch", FORWARD), ("ops", "triton", FORWARD)),
}


def _ratios(tables: dict) -> dict:
    """Per timing mode: the issue's goals on the layers, and the same on the bare ops (None: not timed)."""
    def ms(mode, table, variant, timing):
        return tables[table].get(variant, {}).get(mode, {}).get(timing)

    out = {}
    for mode in ("eager", "graph"):
        out[mode] = {}
        for name, (numerator, denominator) in RATIOS.items():
            num, den = ms(mode, *numerator), ms(mode, *denominator)
            out[mode][name] = None if num is None or den is None else round(num / den, 3)
    return out


def _autotuned_configs() -> dict:
    from dasam3_kernels import triton_backward, triton_down_proj, triton_up_proj

    configs = {}
    for module in (triton_up_proj, triton_down_proj, triton_backward):
        tuner = getattr(module, "_tuned", None)
        configs[module.__name__.rsplit(".", 1)[-1]] = str(getattr(tuner, "best_config", None))
    return configs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.out.exists():
        print(f"{args.out} exists; pass a new --out", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    import triton

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad_out = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, generator=gen)
    started = time.time()
    payload = {
        "hardware": hardware_name(device) + ("" if device.type == "cuda" else " (smoke test)"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": sys.version.split()[0]},
        "shape": {"tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts,
                  "top_k": args.top_k, "rank": args.rank, "dtype": args.dtype},
        "backends": available_backends(device),
        "tests_exit_code": args.tests_exit_code,
        "goals": GOALS,
        "results": {},
    }
    for activation in args.activations:  # written after each, so a cut-short run still leaves figures
        layers = _layer_variants(args, activation, x, grad_out)
        ops = _op_variants(args, activation, x, grad_out)
        payload["results"][activation] = {"layers": layers, "ops": ops,
                                          "ratios": _ratios({"layers": layers, "ops": ops})}
        payload["autotuned_configs"] = _autotuned_configs()
        payload["benchmark_seconds"] = round(time.time() - started, 1)
        write_text(args.out, json.dumps(payload, indent=2) + "\n")
        if os.environ.get("OUT"):
            shutil.copy(args.out, Path(os.environ["OUT"]) / args.out.name)
        print(json.dumps({activation: payload["results"][activation]["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

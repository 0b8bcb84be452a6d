"""GPU benchmark of the DA-MoE layer: a dense cuBLAS FFN against the torch path, a standard MoE (full
experts) and the fused Triton path, forward and training step, written as JSON; the same for a gated
FFN (`*_gated`: act(gate x) ⊙ fc1 x, GeGLU with gelu) against the dense gated FFN.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Defaults are the issue's shape (T = 16384, D = 256, F = 2048, E = 4, k = 2, r = 8, bf16).  Every
variant is timed twice: `eager` (triton.testing.do_bench: median ms of back-to-back calls, the CPU's
launch overhead included where it is not hidden) and `graph` (do_bench_cudagraph: the same calls
replayed from a CUDA graph, i.e. GPU time only; null where a variant cannot be captured).  The
training step is forward + backward with gradients for x and every trainable parameter (lora
factors and router for the MoE variants; x alone for the frozen dense FFN).  `ops` times the expert
ops alone on one fixed routing (the router and aux losses left out).

Every contender is timed in its own guard: an error is recorded in its place and the others go on,
and the JSON is rewritten after each one, so a run cut short keeps what it measured.

`--dry-run` walks every contender on the CPU at a toy shape (set TRITON_INTERPRET=1 for the Triton
ones) and writes nothing: it proves the wiring, it measures nothing.  `--device cpu` with small shapes
is the same smoke test with a JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
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
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (must not exist)")
    parser.add_argument("--dry-run", action="store_true", help="every contender on the CPU at a toy shape, no file")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.out = "cpu", None
        args.tokens, args.d_model, args.d_ff, args.activations = 16, 16, 32, args.activations[:1]
    elif args.out is None:
        parser.error("--out is required (or --dry-run)")
    return args


def guarded(name: str, measure: Callable[[], dict]) -> dict:
    """`measure()`, or {"error": ...} when it raises: one failing contender must not lose the others."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001  (any failure of a contender is a result to record)
        traceback.print_exc()
        print(f"  {name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return {"error": f"{type(error).__name__}: {error}"}


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


def _layer(args, activation: str, backend: str, expert_type: str, device, dtype, gated: bool = False) -> DAMoE:
    torch.manual_seed(0)
    layer = DAMoE(args.d_model, args.d_ff, num_experts=args.experts, top_k=args.top_k, rank=args.rank,
                  activation=activation, expert_type=expert_type, backend=backend, device=device, dtype=dtype,
                  gated=gated)
    if expert_type == "lowrank":
        with torch.no_grad():  # non-zero B factors, as after training (the kernels' cost does not depend on it)
            for param in layer.expert_parameters():
                param.normal_(std=param.shape[-1] ** -0.5)
    return layer


# name: (backend, expert_type, gated) of the layer contenders; the dense FFNs are timed first, as the baselines.
LAYER_VARIANTS = {"torch": ("torch", "lowrank", False), "standard_moe": ("auto", "full", False),
                  "triton": ("triton", "lowrank", False), "cuda": ("cuda", "lowrank", False),
                  "torch_gated": ("torch", "lowrank", True), "triton_gated": ("triton", "lowrank", True),
                  "cuda_gated": ("cuda", "lowrank", True)}
OP_VARIANTS = ("torch", "triton", "cuda")


def _dense(args, activation, x, grad_out, gated: bool = False) -> dict:
    def linear(n_in, n_out):
        return torch.nn.Linear(n_in, n_out, device=x.device, dtype=x.dtype).requires_grad_(False)

    fc1, fc2, act = linear(args.d_model, args.d_ff), linear(args.d_ff, args.d_model), activation_fn(activation)
    if gated:
        gate = linear(args.d_model, args.d_ff)
        return _timed(lambda: fc2(act(gate(x)) * fc1(x)), [x], grad_out)
    return _timed(lambda: fc2(act(fc1(x))), [x], grad_out)


def _layer_variant(args, activation, x, grad_out, backend: str, expert_type: str, gated: bool = False) -> dict:
    layer = _layer(args, activation, backend, expert_type, x.device, x.dtype, gated)
    leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]
    result = _timed(lambda: layer(x), leaves, grad_out, module=layer)
    result["backend"] = layer.backend if backend != "auto" else \
        resolve_backend("auto", x.device, full_experts=expert_type == "full", dtype=x.dtype).name
    return result


def _op_variant(args, activation, x, grad_out, name: str) -> dict:
    """The expert op of backend `name` alone, on one fixed routing."""
    op = load_backend(name).lowrank_moe
    layer = _layer(args, activation, "torch", "lowrank", x.device, x.dtype)
    with torch.no_grad():
        indices, weights, _ = routing.route(x, layer.router.token_proj.weight, layer.router.token_proj.bias, None,
                                            args.top_k)
    weights.requires_grad_()
    lora = [layer.fc1_lora_A, layer.fc1_lora_B, layer.fc2_lora_A, layer.fc2_lora_B]
    frozen = [layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias]
    return _timed(lambda: op(x, indices, weights, *frozen, *lora, layer.scale, activation),
                  [x, weights, *lora], grad_out)


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` (what is missing, how to get it), or None."""
    if backend == "auto":
        return None
    try:
        return load_backend(backend).device_error(device)
    except RuntimeError as error:
        return str(error)


def contenders(args, activation, x, grad_out) -> dict:
    """(table, name) → the measurement to run: the dense baseline, the layers, the bare ops; a contender
    whose backend cannot run here is recorded as skipped, with the reason."""
    def skipped(reason):
        return lambda: {"skipped": reason}

    runs = {("layers", "dense"): lambda: _dense(args, activation, x, grad_out),
            ("layers", "dense_gated"): lambda: _dense(args, activation, x, grad_out, gated=True)}
    for name, (backend, expert_type, gated) in LAYER_VARIANTS.items():
        reason = unavailable(backend, x.device)
        runs["layers", name] = skipped(reason) if reason else \
            lambda b=backend, e=expert_type, g=gated: _layer_variant(args, activation, x, grad_out, b, e, g)
    for name in OP_VARIANTS:
        reason = unavailable(name, x.device)
        runs["ops", name] = skipped(reason) if reason else lambda n=name: _op_variant(args, activation, x, grad_out, n)
    return runs


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
    "triton_gated_forward_vs_dense_gated": (("layers", "triton_gated", FORWARD), ("layers", "dense_gated", FORWARD)),
    "triton_gated_train_vs_dense_gated": (("layers", "triton_gated", TRAIN), ("layers", "dense_gated", TRAIN)),
    "torch_vs_triton_gated_train": (("layers", "torch_gated", TRAIN), ("layers", "triton_gated", TRAIN)),
    "cuda_gated_forward_vs_dense_gated": (("layers", "cuda_gated", FORWARD), ("layers", "dense_gated", FORWARD)),
    "cuda_gated_train_vs_dense_gated": (("layers", "cuda_gated", TRAIN), ("layers", "dense_gated", TRAIN)),
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
    if args.out is not None and args.out.exists():
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
    failures = 0
    for activation in args.activations:
        tables = payload["results"][activation] = {"layers": {}, "ops": {}}
        for (table, name), measure in contenders(args, activation, x, grad_out).items():
            print(f"[{activation}] {table} {name}", flush=True)
            tables[table][name] = guarded(f"{table} {name}", measure)
            failures += "error" in tables[table][name]
            tables["ratios"] = _ratios(tables)
            payload["autotuned_configs"] = _autotuned_configs()
            payload["benchmark_seconds"] = round(time.time() - started, 1)
            if args.out is not None:  # after every contender: a run cut short keeps what it measured
                write_text(args.out, json.dumps(payload, indent=2) + "\n")
        if not args.dry_run:  # a dry run's timings are no figures
            print(json.dumps({activation: tables["ratios"]}, indent=2))
    print(f"{failures} contender(s) failed" if failures else "every contender ran")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""`dasam3 bench`: the DA-MoE layer against the dense FFN it wraps, and the parameter table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="default: float32 on the CPU, bfloat16 on a GPU")
    parser.add_argument("--precision", choices=("autocast", "cast"), default=None,
                        help="half dtypes: 'autocast' runs fp32 modules under torch.autocast(device, dtype) "
                             "(mixed precision), 'cast' converts modules and input to dtype; default: autocast "
                             "on the CPU, cast on a GPU")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="CPU thread counts to time, each a full table (e.g. 1 2); default: torch's current")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sample")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--activation", default="gelu", choices=("gelu", "gelu_tanh", "relu", "silu"))
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend available")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds of timing per measurement (the slowest contender's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="'cpu': the process's CPU time, far less inflated by other processes' load "
                             "than wall time (best at 1 thread: OpenMP's spin-waiting counts)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    from dasam3 import benchmark

    on_gpu = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    precision = args.precision or ("cast" if on_gpu else "autocast")
    autocast = precision == "autocast" and dtype != torch.float32
    shape = benchmark.BenchShape(args.batch, args.tokens, args.d_model, args.d_ff, args.experts, args.top_k,
                                 args.rank, args.activation)
    result = benchmark.run(shape, args.device, dtype, args.backends, args.min_time, autocast=autocast,
                           threads=args.threads, clock=args.clock)
    print(benchmark.format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0

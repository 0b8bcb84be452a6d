"""`dasam3 kernels`: compile every GPU kernel config for sm_80/sm_90 here, without a GPU, and report
registers, spills, shared memory and tensor-core instructions (`dasam3_kernels.static_report`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# The representative subset CI compiles: bf16 in every autotune config, fp16 in the first config of
# each kernel; plain and gated layers; the layer's default activation (gated: silu, SwiGLU's);
# deterministic reductions; the larger benchmark shape.
CI_SUBSET = ({"dtypes": ["bf16"], "configs_per_kernel": None}, {"dtypes": ["fp16"], "configs_per_kernel": 1})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dasam3_kernels.activations import ACTIVATIONS
    from dasam3_kernels.static_report import ARCHS, DTYPES, TOKENS

    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["sm_90"])
    parser.add_argument("--json", type=Path, default=None, help="write the entries here (must not exist)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown at the end")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="fp32 compiles the TF32 kernels, the only fp32 ones backend='auto' runs")
    parser.add_argument("--activations", nargs="+", choices=ACTIVATIONS, default=list(ACTIVATIONS))
    parser.add_argument("--reductions", nargs="+", choices=("deterministic", "atomic"),
                        default=["deterministic", "atomic"])
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--ffn", nargs="+", choices=("plain", "gated"), default=["plain", "gated"],
                        help="the layers compiled: plain FFN experts, gated (SwiGLU/GeGLU) ones")
    parser.add_argument("--subset", choices=("ci",), default=None,
                        help="ci: bf16 in every config and fp16 in one, plain (gelu) and gated (silu) layers, "
                             "deterministic, T = 16384")
    parser.add_argument("--cubin-dir", type=Path, default=None,
                        help="where the cubins go (default: beside --json, else a temporary directory)")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA extension's kernels")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when an fp16/bf16 config spills, misses the tensor cores or the shared memory")


def _entries(args: argparse.Namespace, arch: str, cubin_dir: Path) -> list:
    from dasam3_kernels import static_report

    if args.subset == "ci":
        entries = []
        for part in CI_SUBSET:
            for gated, activation in ((False, "gelu"), (True, "silu")):
                cuda = not args.no_cuda and part is CI_SUBSET[0] and not gated
                entries += static_report.report(arch, activations=[activation], atomics=[False], tokens=(16384,),
                                                cubin_dir=cubin_dir, cuda=cuda, ffns=(gated,), **part)
        return entries
    return static_report.report(arch, dtypes=args.dtypes, activations=args.activations,
                                atomics=[r == "atomic" for r in args.reductions], tokens=tuple(args.tokens),
                                cubin_dir=cubin_dir, cuda=not args.no_cuda,
                                ffns=tuple(f == "gated" for f in args.ffn))


def run(args: argparse.Namespace) -> int:
    from dasam3.io import write_text
    from dasam3_kernels import static_report

    if args.json is not None and args.json.exists():
        print(f"{args.json} exists; pass a new --json", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("dasam3 kernels compiles for a GPU: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        default_dir = args.json.with_name(args.json.stem + "_cubins") if args.json else Path(tmp)
        cubin_dir = args.cubin_dir or default_dir
        entries = []
        for arch in args.arch:
            entries += _entries(args, arch, cubin_dir)
        if args.json is not None:
            write_text(args.json, json.dumps(static_report.as_json(entries), indent=2) + "\n")
    if args.markdown:
        print(static_report.markdown_table(entries))
    problems = static_report.budget_violations(entries)
    for problem in problems:
        print(f"over budget: {problem}")
    print(f"{len(entries)} kernel configs, {len(problems)} over budget")
    return 1 if args.check and problems else 0

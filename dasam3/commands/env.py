"""`dasam3 env`: what a bug report needs, like `torch.utils.collect_env`: versions (Python, torch, triton,
CUDA, compilers), the CPU's instruction set and the compiled variant it loads, the GPU and its arch, and
every backend, available or not and why (what is missing, how to get it)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, default=None, help="also write the report here (must not exist)")


def _first_line(command: list[str]) -> str | None:
    """The version line of a tool, or None when it is not installed."""
    if shutil.which(command[0]) is None:
        return None
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    release = [line for line in output if "release" in line or "version" in line.lower()]
    return (release or output or [None])[-1 if command[0] == "nvcc" else 0]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def versions() -> dict:
    import torch

    from dasam3 import __version__

    return {"dasam3": __version__, "python": sys.version.split()[0], "platform": platform.platform(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": _version("triton"),
            "nvcc": _first_line(["nvcc", "--version"]), "c++": _first_line(["c++", "--version"]),
            "ninja": _first_line(["ninja", "--version"])}


def cpu() -> dict:
    import torch

    from dasam3.benchmark import hardware_name

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        present = [flag for flag in CPU_FLAGS if f" {flag}" in flags]
    except (OSError, StopIteration):
        present = []
    try:
        from dasam3_kernels import cpp_ops

        variant = cpp_ops.cpu_variant()
    except RuntimeError as error:
        variant = f"none ({error})"
    return {"model": hardware_name("cpu"), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_flags": present, "threads": torch.get_num_threads(), "dasam3_cpu_variant": variant}


def gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        why = "torch has no CUDA" if torch.version.cuda is None else "no CUDA device or driver is visible"
        return {"available": False, "why": why}
    props = torch.cuda.get_device_properties(0)
    return {"available": True, "count": torch.cuda.device_count(), "name": props.name,
            "arch": f"sm_{props.major}{props.minor}", "sms": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1), "driver": _first_line(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])}


def backends() -> dict:
    import torch

    from dasam3_kernels import BACKENDS, load_backend, resolve_backend

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {}
    for name in BACKENDS:
        if name == "auto":
            continue
        try:
            backend = load_backend(name)
        except RuntimeError as error:
            report[name] = {"available": False, "why": str(error)}
            continue
        targets = (name,) if name in ("cpu", "cuda") else ("cpu", "cuda")  # the compiled ones: one device each
        errors = {d: backend.device_error(torch.device(d)) for d in targets}
        report[name] = {"available": True, "runs_on": [d for d in devices if d in targets and errors[d] is None],
                        **{f"not_on_{d}": e for d, e in errors.items() if e is not None}}
    report["auto"] = {f"{d} {dt}": resolve_backend("auto", torch.device(d), dtype=getattr(torch, dt)).name
                      for d in devices for dt in ("float32", "bfloat16")}
    return report


def collect() -> dict:
    settings = {k: os.environ[k] for k in ("TRITON_INTERPRET", "DASAM3_TRITON_ATOMICS", "ATEN_CPU_CAPABILITY",
                                           "CUDA_HOME", "TORCH_CUDA_ARCH_LIST") if k in os.environ}
    return {"versions": versions(), "cpu": cpu(), "gpu": gpu(), "backends": backends(), "environment": settings}


def format_report(report: dict, indent: int = 0) -> str:
    lines = []
    for key, value in report.items():
        if isinstance(value, dict) and value:
            lines += [" " * indent + f"{key}:", format_report(value, indent + 2)]
        elif isinstance(value, dict):
            lines.append(" " * indent + f"{key}: (none)")
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from dasam3.io import write_text

    if args.json is not None and args.json.exists():
        print(f"{args.json} exists; pass a new --json", file=sys.stderr)
        return 2
    report = collect()
    print(format_report(report))
    if args.json is not None:
        write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0

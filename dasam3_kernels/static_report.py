"""Static resource report of the GPU kernels for sm_80 and sm_90, compiled here without a GPU.

Triton's real compiler runs without a driver: `triton.compile(ASTSource(...), target=GPUTarget("cuda",
90, 32))` builds the cubin a GPU would run, and the `cuobjdump` inside the triton wheel reads its
registers, stack (spills), shared memory and instructions.  This module drives the Triton wrappers on
meta tensors at the benchmark shapes (`triton_common.recording_launches` records what they would
launch), compiles every config the autotuner can choose, and reads the CUDA extension's kernels from
the built library (for sm_80 its embedded compute_80 PTX is assembled with the wheel's `ptxas`, as the
driver would).  `budget_violations` is the gate CI runs: no fp16/bf16 config may spill, miss the tensor
cores or need more shared memory than the arch has.

    python -m dasam3 kernels --arch sm_90 --json sm90.json
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .activations import ACTIVATIONS

# Per arch: compute capability, SMs of the GPU the benchmarks name (A100, H100/H200 SXM), and the
# most shared memory one block may opt in to.
ARCHS = {"sm_80": (80, 108, 166912), "sm_90": (90, 132, 232448)}
# The benchmark shapes: SAM3's fusion-encoder FFN at batch 4 and 16.
SHAPE = {"d_model": 256, "d_ff": 2048, "experts": 4, "top_k": 2, "rank": 8}
TOKENS = (4096, 16384)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
GATED_DTYPES = ("fp16", "bf16")  # budget_violations applies to these
TENSOR_CORE_OPCODES = ("HGMMA", "HMMA", "IMMA")


@dataclass
class Entry:
    """One compiled kernel config and what its cubin needs."""

    kernel: str
    arch: str
    dtype: str
    activation: str | None
    config: dict
    registers: int
    spill_bytes: int  # stack frame per thread (local memory), where spills land
    shared_bytes: int
    tensor_core_instructions: int
    compile_s: float
    cubin: str
    source: str = "triton"  # or "cuda" (the csrc/ extension)
    flags: dict = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    programs: int | None = None  # grid size at the largest of `tokens`
    local_memory_instructions: int = 0  # LDL + STL in the SASS
    shared_limit: int = 0


def tool(name: str) -> Path:
    """A CUDA binary tool shipped inside the triton wheel (cuobjdump, ptxas), else from PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.exists():
        return bundled
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not in the triton wheel ({bundled}) nor on PATH")
    return Path(found)


def read_cubin(path: Path) -> dict[str, dict]:
    """Per kernel (mangled name): registers, stack, static shared memory and SASS counts of a cubin/library."""
    usage = subprocess.run([tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                           check=True).stdout
    kernels: dict[str, dict] = {}
    name = None
    for line in usage.splitlines():
        if match := re.search(r"Function (\S+):", line):
            name = match.group(1)
        elif name and (match := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)):
            kernels[name] = {"registers": int(match[1]), "stack": int(match[2]), "shared": int(match[3])}
    sass = subprocess.run([tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout
    name = None
    for line in sass.splitlines():
        if match := re.search(r"Function : (\S+)", line):
            name = match.group(1)
            kernels.setdefault(name, {}).update(tensor_core=0, local=0)
        elif name and (match := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            opcode = match.group(1)
            kernels[name]["tensor_core"] += opcode.startswith(TENSOR_CORE_OPCODES)
            kernels[name]["local"] += opcode in ("LDL", "STL")
    return kernels


def toolkit_ptxas() -> Path:
    """The CUDA toolkit's ptxas (it reads the PTX its own nvcc wrote; the wheel's may be older), else the wheel's."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in filter(None, homes):
        if (Path(home) / "bin" / "ptxas").exists():
            return Path(home) / "bin" / "ptxas"
    return tool("ptxas")


# -- Triton: the launches of one layer step, recorded on meta tensors --------------------------------


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def layer_launches(dtype: torch.dtype, activation: str, atomic: bool, tokens: int, sm_count: int,
                   gated: bool = False) -> list:
    """(role, Launch) of one training step of the default layer (every projection adapted, biases),
    forward and backward, as the Triton backend launches it.  gated: only the launches that differ from
    the plain layer's (the router and fc2's down-projection are the same kernels)."""
    from .triton_backward import up_projection_backward
    from .triton_common import Gate, recording_launches
    from .triton_down_proj import down_projection
    from .triton_ops import input_grad
    from .triton_router import route_backward, route_forward
    from .triton_up_proj import up_projection

    T, D, F = tokens, SHAPE["d_model"], SHAPE["d_ff"]
    E, k, r = SHAPE["experts"], SHAPE["top_k"], SHAPE["rank"]

    def meta(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt)

    x, g = meta(T, D), meta(T, D)
    W1, b1, W2, b2 = meta(F, D), meta(F), meta(D, F), meta(D)
    A1, B1, A2, B2 = meta(E, r, D), meta(E, F, r), meta(E, r, F), meta(E, D, r)
    gate = Gate(meta(F, D), meta(F), meta(E, r, D), meta(E, F, r)) if gated else None
    router_w, router_b = meta(E, D), meta(E)
    indices, weights, probs = meta(T, k, dt=torch.int64), meta(T, k, dt=torch.float32), meta(T, E, dt=torch.float32)
    projections = 2 if gated else 1  # the down projections x feeds: fc1 (and the gate)
    roles = []
    with recording_launches(sm_count) as launches, _tf32(dtype == torch.float32):
        def record(role, fn, *args, **kwargs):
            before = len(launches)
            fn(*args, **kwargs)
            roles.extend((role, launch) for launch in launches[before:])

        if not gated:
            record("router", route_forward, x, router_w, router_b, None, k)
        record("up_projection", up_projection, x, indices, weights, W1, b1, A1, B1, A2, 1.0, activation, atomic,
               gate)
        if not gated:
            record("down_projection[fc2]", down_projection, meta(T, F), W2.t(), meta(T, E * r, dt=torch.float32),
                   B2.transpose(1, 2), 1.0, b2, weights)
            record("router_backward", route_backward, weights, probs, x, router_w, indices, weights, probs)
        record("backward", up_projection_backward, g, x, indices, weights, W1, b1, W2, A1, B1, A2, B2, 1.0,
               activation, atomic, gate)
        down = [(W1, A1)] + ([(gate.weight, gate.A)] if gated else [])
        record("down_projection[dx]", input_grad, down, meta(T, projections * F),
               meta(T, projections * E * r, dt=torch.float32))
    return roles


def _compile(launch, config: dict, target):
    """The kernel `launch` would compile with `config` (the JIT's own specialisation of its arguments)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**launch.kwargs, **config}
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _public_config(kwargs: dict, config: dict) -> dict:
    """Block sizes, num_warps and num_stages of one launch (the fixed config lives in the kwargs)."""
    merged = {**kwargs, **config}
    return {k: v for k, v in merged.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}


def _programs(grid, config: dict) -> int:
    dims = grid(config) if callable(grid) else grid
    total = 1
    for dim in dims:
        total *= dim
    return total


def triton_entries(arch: str, dtypes: list[str], activations: list[str], atomics: list[bool],
                   tokens: tuple[int, ...], cubin_dir: Path, configs_per_kernel: int | None = None,
                   log=print, ffns: tuple[bool, ...] = (False, True)) -> list[Entry]:
    """Every distinct compilation the layer's launches need on `arch`, one Entry each (`ffns`: plain
    (False) and gated (True) layers)."""
    from triton.backends.compiler import GPUTarget

    capability, sm_count, shared_limit = ARCHS[arch]
    target = GPUTarget("cuda", capability, 32)
    entries: dict[str, Entry] = {}
    for dtype_name in dtypes:
        for gated in ffns:
            for activation in activations:
                for atomic in atomics:
                    for T in sorted(tokens):
                        for role, launch in layer_launches(DTYPES[dtype_name], activation, atomic, T, sm_count,
                                                           gated):
                            configs = launch.configs[:configs_per_kernel] if configs_per_kernel else launch.configs
                            for config in configs:
                                flags = _flags(role, launch, atomic, gated)
                                _add_triton_entry(entries, arch, dtype_name, activation, flags, T, role, launch,
                                                  config, target, cubin_dir, shared_limit, log)
    return list(entries.values())


_BACKWARD_PASSES = {1: "routing+fc1", 2: "gate"}  # triton_backward's SIDE


def _flags(role: str, launch, atomic: bool, gated: bool) -> dict:
    """What tells apart the launches of one role: reductions, a gated FFN, the backward's pass."""
    flags = {}
    if role in ("up_projection", "backward"):
        flags["atomic"] = atomic
    if role in ("up_projection", "backward", "down_projection[dx]"):
        flags["gated"] = gated
    if role == "backward":
        flags["pass"] = _BACKWARD_PASSES[launch.kwargs["SIDE"]]
    return flags


def _add_triton_entry(entries, arch, dtype_name, activation, flags, T, role, launch, config, target, cubin_dir,
                      shared_limit, log) -> None:
    uses_activation = role in ("up_projection", "backward")
    public = _public_config(launch.kwargs, config)
    key = repr((role, dtype_name, activation if uses_activation else None, flags, sorted(public.items())))
    programs = _programs(launch.grid, {**launch.kwargs, **config})
    if key in entries:  # a larger T: the same binary, a bigger grid
        entries[key].tokens.append(T)
        entries[key].programs = programs
        return
    started = time.perf_counter()
    compiled = _compile(launch, config, target)
    seconds = time.perf_counter() - started
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    cubin = cubin_dir / f"{arch}_{launch.kernel.__name__.strip('_')}_{digest}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    (usage,) = read_cubin(cubin).values()
    entries[key] = Entry(
        kernel=role, arch=arch, dtype=dtype_name, activation=activation if uses_activation else None, config=public,
        registers=usage["registers"], spill_bytes=usage["stack"],
        shared_bytes=max(usage["shared"], int(compiled.metadata.shared)),
        tensor_core_instructions=usage["tensor_core"], compile_s=round(seconds, 2), cubin=str(cubin), flags=flags,
        tokens=[T], programs=programs, local_memory_instructions=usage["local"], shared_limit=shared_limit)
    log(format_row(entries[key]))


# -- the CUDA extension ------------------------------------------------------------------------------


def cuda_library() -> Path | None:
    from .cpp_ops import _library_path

    return _library_path("_C_cuda")


_CUDA_TEMPLATE = re.compile(r"(forward|backward)_kernel<(c10::Half|c10::BFloat16|float|double), \w+, "
                            r"\(dasam3::(?:\(anonymous namespace\)::)?Activation\)(\d)(?:, (true|false))?>")
_CUDA_DTYPES = {"c10::Half": "fp16", "c10::BFloat16": "bf16", "float": "fp32", "double": "fp64"}
_CUDA_ACTIVATIONS = ACTIVATIONS  # csrc/damoe_common.h's Activation enum lists them in this order


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None:
        return names
    return subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


def cuda_entries(arch: str, library: Path, cubin_dir: Path) -> list[Entry]:
    """The extension's kernels for `arch`: its sm_90 machine code as built, or its compute_80 PTX
    assembled for sm_80 with ptxas (what the driver's JIT does on an A100)."""
    capability, _, shared_limit = ARCHS[arch]
    with tempfile.TemporaryDirectory() as tmp:
        listing = subprocess.run([tool("cuobjdump"), "-lelf", "-lptx", str(library)], capture_output=True,
                                 text=True).stdout
        cubin = cubin_dir / f"{arch}_damoe_cuda.cubin"
        started = time.perf_counter()
        if f"sm_{capability}.cubin" in listing:
            subprocess.run([tool("cuobjdump"), "-xelf", "all", str(library)], cwd=tmp, check=True,
                           capture_output=True)
            elfs = [p for p in Path(tmp).glob("*.cubin") if f"sm_{capability}" in p.name]
            if not elfs:
                return []
            shutil.copy(elfs[0], cubin)
        else:
            subprocess.run([tool("cuobjdump"), "-xptx", "all", str(library)], cwd=tmp, check=True,
                           capture_output=True)
            ptx = sorted(Path(tmp).glob("*.ptx"))
            if not ptx:
                return []
            subprocess.run([toolkit_ptxas(), f"-arch=sm_{capability}", "-O3", str(ptx[0]), "-o", str(cubin)],
                           check=True, capture_output=True)
        seconds = time.perf_counter() - started
    usage = read_cubin(cubin)
    entries = []
    for mangled, name in zip(usage, _demangle(list(usage))):
        match = _CUDA_TEMPLATE.search(name)
        if match is None:
            continue
        kind, dtype, act, gated = match.groups()
        u = usage[mangled]
        entries.append(Entry(
            kernel=f"cuda {kind}_kernel", arch=arch, dtype=_CUDA_DTYPES[dtype], activation=_CUDA_ACTIVATIONS[int(act)],
            config={"threads": 256, "tile": "64x64"}, flags={"gated": True} if gated == "true" else {},
            registers=u.get("registers", 0), spill_bytes=u.get("stack", 0),
            shared_bytes=u.get("shared", 0), tensor_core_instructions=u.get("tensor_core", 0),
            compile_s=round(seconds, 2), cubin=str(cubin), source="cuda",
            local_memory_instructions=u.get("local", 0), shared_limit=shared_limit))
    return entries


# -- the gate and the table --------------------------------------------------------------------------


def budget_violations(entries: list[Entry]) -> list[str]:
    """What breaks the budget, one line each: a Triton fp16/bf16 config that spills, runs no
    tensor-core instruction or needs more shared memory than its arch has.  (The CUDA extension's
    epilogue kernels do no matrix products: cuBLAS does them; they are held to no spills.)"""
    problems = []
    for e in entries:
        if e.dtype not in GATED_DTYPES:
            continue
        where = f"{e.kernel} {e.arch} {e.dtype} {e.activation or ''} {e.config}"
        if e.spill_bytes > 0 or e.local_memory_instructions > 0:
            problems.append(f"{where}: spills ({e.spill_bytes} bytes of stack, "
                            f"{e.local_memory_instructions} LDL/STL)")
        if e.source == "triton" and e.tensor_core_instructions == 0:
            problems.append(f"{where}: no tensor-core instruction")
        if e.shared_bytes > e.shared_limit:
            problems.append(f"{where}: {e.shared_bytes} bytes of shared memory > {e.shared_limit}")
    return problems


HEADER = (f"{'kernel':<36} {'arch':<5} {'dtype':<5} {'activation':<10} {'config':<34} {'regs':>4} {'spill':>5} "
          f"{'smem':>6} {'TC':>5} {'s':>5}")


def _config_text(config: dict) -> str:
    short = {"BLOCK_T": "T", "BLOCK_N": "N", "BLOCK_K": "K", "BLOCK_F": "F", "BLOCK_D": "D", "num_warps": "w",
             "num_stages": "s"}
    return " ".join(f"{short.get(k, k)}{v}" for k, v in config.items())


def display_name(e: Entry) -> str:
    """The kernel's role, and for a gated layer's launches "gated" (and the backward's pass)."""
    gated = f" gated[{e.flags['pass']}]" if e.flags.get("gated") and "pass" in e.flags else \
        " gated" if e.flags.get("gated") else ""
    return e.kernel + gated + (" (atomic)" if e.flags.get("atomic") else "")


def format_row(e: Entry) -> str:
    name = display_name(e)
    return (f"{name:<36} {e.arch:<5} {e.dtype:<5} {e.activation or '-':<10} {_config_text(e.config):<34} "
            f"{e.registers:>4} {e.spill_bytes:>5} {e.shared_bytes:>6} {e.tensor_core_instructions:>5} "
            f"{e.compile_s:>5.1f}")


def markdown_table(entries: list[Entry]) -> str:
    lines = ["| kernel | arch | dtype | activation | config | registers | spill bytes | shared bytes | "
             "tensor-core instr. |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        name = display_name(e)
        lines.append(f"| {name} | {e.arch} | {e.dtype} | {e.activation or '-'} | {_config_text(e.config)} | "
                     f"{e.registers} | {e.spill_bytes} | {e.shared_bytes} | {e.tensor_core_instructions} |")
    return "\n".join(lines)


def check_compiler_mode() -> None:
    """The report needs Triton's real compiler: kernels defined under TRITON_INTERPRET=1 cannot compile."""
    from .triton_common import INTERPRET

    if INTERPRET or os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the static report compiles the kernels for a GPU: unset TRITON_INTERPRET "
                           "(got TRITON_INTERPRET=1, under which Triton only interprets)")


def report(arch: str, *, dtypes: list[str], activations: list[str], atomics: list[bool], tokens=TOKENS,
           cubin_dir: Path, configs_per_kernel: int | None = None, cuda: bool = True, log=print,
           ffns: tuple[bool, ...] = (False, True)) -> list[Entry]:
    """Entries for `arch`: the Triton configs (plain and/or gated layers: `ffns`), then the CUDA
    extension's kernels when it is built."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    check_compiler_mode()
    cubin_dir.mkdir(parents=True, exist_ok=True)
    log(HEADER)
    entries = triton_entries(arch, dtypes, activations, atomics, tokens, cubin_dir, configs_per_kernel, log, ffns)
    library = cuda_library() if cuda else None
    if library is not None:
        for e in cuda_entries(arch, library, cubin_dir):
            if e.dtype in dtypes and e.activation in activations:
                entries.append(e)
                log(format_row(e))
    elif cuda:
        log("(the CUDA extension is not built: DASAM3_BUILD_CUDA=1 python setup.py build_ext --inplace)")
    return entries


def as_json(entries: list[Entry]) -> list[dict]:
    return [asdict(e) for e in entries]

"""Builds the optional compiled kernels of csrc/ (issue 4); the package installs without them.

    pip install torch && pip install -e . --no-build-isolation      # or: python setup.py build_ext --inplace

builds `dasam3_kernels/_C_cpu_{default,avx2,avx512}` (the C++ kernels once per x86 instruction set;
the loader picks the one the CPU runs) and, when torch has CUDA and nvcc is found, `_C_cuda`.
Without torch at build time (e.g. an isolated build) or without a compiler, dasam3 installs as pure
Python and `backend="cpu"`/`"cuda"` raise a RuntimeError saying how to build them.

Environment:
  DASAM3_BUILD_CPU=0|1    build the CPU kernels (default: try, and warn on failure)
  DASAM3_BUILD_CUDA=0|1   build the CUDA kernels (default: when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST    CUDA targets (default: sm_90 machine code + compute_80 PTX for newer GPUs)
With 1 a failed build is an error (CI builds that way, so that a broken kernel never lands).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.errors import BaseError, CCompilerError

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
CPU_SOURCES = [f"{CSRC}/damoe_cpu.cpp"]
CUDA_SOURCES = [f"{CSRC}/damoe_cuda.cu"]

# Per instruction set, the flags ATen compiles its own CPU kernels with (GCC/Clang, then MSVC).
ISA_FLAGS = {
    "default": ([], []),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ["/arch:AVX2"]),
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-Wno-uninitialized"],  # GCC's false alarms on its own _mm512_undefined_* in ATen's vec512
               ["/arch:AVX512"]),
}
# What a failed compiler run raises through setuptools and torch's BuildExtension.
BUILD_ERRORS = (BaseError, CCompilerError, OSError, RuntimeError, subprocess.SubprocessError)
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=compute_80"]


def env_switch(name: str) -> bool | None:
    """True/False when `name` is set to 1/0, None when unset ("auto")."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "on", "yes", "0", "false", "off", "no"):
        return value in ("1", "true", "on", "yes")
    raise SystemExit(f"{name} must be 0 or 1, got {value!r}")


def cpu_variants() -> list[str]:
    x86 = platform.machine().lower() in ("x86_64", "amd64", "x64")
    return list(ISA_FLAGS) if x86 else ["default"]


def cpu_extension(cpp_extension, isa: str):
    msvc = sys.platform == "win32"
    gnu_flags, msvc_flags = ISA_FLAGS[isa]
    capability = isa.upper()
    defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    if msvc:
        cflags, ldflags = ["/O2", "/openmp", *msvc_flags], []
    else:  # at::parallel_for is OpenMP in PyTorch's builds: without -fopenmp it would run serially
        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        quiet = ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]  # ATen's headers, seen by GCC
        cflags, ldflags = ["-O3", "-g0", *quiet, *openmp, *gnu_flags], openmp  # -g0: Python's CFLAGS say -g
    return cpp_extension.CppExtension(
        name=f"dasam3_kernels._C_cpu_{isa}",
        sources=CPU_SOURCES,
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": cflags + defines},
        extra_link_args=ldflags,
    )


def ensure_cuda_home() -> None:
    """torch takes the CUDA toolkit from CUDA_HOME, else from the nvcc on PATH; a wrapper script there
    (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc) would make it look for the
    toolkit's libraries under /usr/local.  Name a complete toolkit when torch's guess is not one.
    Runs before torch.utils.cpp_extension is imported (it reads CUDA_HOME at import)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates += [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"), reverse=True)]
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


def cuda_include_fallback(torch) -> None:
    """Lets nvcc find the CUDA library headers (cusparse.h, ...) that ATen's CUDA headers include when
    the toolkit lacks them but the pip-installed nvidia wheels ship them: appended to CPATH, so the
    toolkit's own headers still come first."""
    for include in sorted((Path(torch.__file__).parent.parent / "nvidia").glob("cu*/include")):
        if (include / "cusparse.h").exists():
            paths = [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
            if str(include) not in paths:
                os.environ["CPATH"] = os.pathsep.join([*paths, str(include)])
            return


def cuda_extension(torch, cpp_extension):
    cuda_include_fallback(torch)
    arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else CUDA_ARCH_FLAGS
    return cpp_extension.CUDAExtension(
        name="dasam3_kernels._C_cuda",
        sources=CUDA_SOURCES,
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3", "--threads=2", *arch_flags]},
    )


def cuda_buildable(torch, cpp_extension) -> str | None:
    """None when the CUDA kernels can be built here, else why not."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    nvcc = Path(cpp_extension.CUDA_HOME) / "bin" / ("nvcc.exe" if sys.platform == "win32" else "nvcc")
    return None if nvcc.exists() else f"{nvcc} does not exist"


def extensions_and_commands() -> tuple[list, dict]:
    build_cpu, build_cuda = env_switch("DASAM3_BUILD_CPU"), env_switch("DASAM3_BUILD_CUDA")
    if build_cuda is not False:
        ensure_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if build_cpu or build_cuda:
            raise SystemExit("DASAM3_BUILD_CPU/CUDA=1 needs torch at build time: install torch, then "
                             "`pip install -e . --no-build-isolation`")
        print("dasam3: torch is not importable at build time; installing without the compiled kernels "
              "(install torch, then `pip install -e . --no-build-isolation` to build them)")
        return [], {}

    extensions, required = [], set()
    if build_cpu is not False:
        extensions += [cpu_extension(cpp_extension, isa) for isa in cpu_variants()]
        if build_cpu:
            required |= {ext.name for ext in extensions}
    if build_cuda is not False:
        why_not = cuda_buildable(torch, cpp_extension)
        if why_not is None:
            extensions.append(cuda_extension(torch, cpp_extension))
            if build_cuda:
                required.add("dasam3_kernels._C_cuda")
        elif build_cuda:
            raise SystemExit(f"DASAM3_BUILD_CUDA=1 but the CUDA kernels cannot be built: {why_not}")
        else:
            print(f"dasam3: not building the CUDA kernels: {why_not}")

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's ninja build, one build directory per extension (the CPU variants share a source
        file), and optional extensions: one that fails to build (no compiler, a failing one) warns and
        is left out, unless DASAM3_BUILD_CPU/CUDA=1 requires it."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()  # checks the compiler first, then build_extension each
            except BUILD_ERRORS as error:
                if required:
                    raise
                print(f"dasam3: WARNING: the compiled kernels were not built ({error}); dasam3 installs "
                      "as pure Python")

        def build_extension(self, ext) -> None:
            base_temp = self.build_temp
            self.build_temp = os.path.join(base_temp, ext.name)
            try:
                super().build_extension(ext)
            except BUILD_ERRORS as error:
                if ext.name in required:
                    raise
                print(f"dasam3: WARNING: {ext.name} failed to build ({error}); dasam3 installs without it")
            finally:
                self.build_temp = base_temp

    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""The CUDA backend's kernels (csrc/damoe_cuda_kernels.cuh) on an emulated GPU, for machines without one.

`emulated_cuda.cpp` compiles the kernels as host code (one std::thread per CUDA thread); this module
builds it with the system's C++ compiler, fills the kernels' argument structs through ctypes, and wraps
them in the host steps of csrc/damoe_cuda.cu (there cuBLAS, here torch on the CPU) as a differentiable
op with the contract of `reference.gated_moe_reference`, so the conformance checks run on it unchanged.
float32 only: the half types differ in the kernels' loads and stores alone.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from dasam3_kernels.activations import ACTIVATIONS

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (Path(__file__).with_name("emulated_cuda.cpp"), ROOT / "csrc" / "damoe_cuda_kernels.cuh",
           ROOT / "csrc" / "damoe_activation.h")
TILE = 64  # kTile of the kernels: tokens and features per block
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIZES = ("tokens", "d_ff", "top_k", "experts", "rank", "pre_ld", "u_ld")


class ForwardArgs(ctypes.Structure):
    """ForwardArgs<float, float>, field for field."""

    _fields_ = [(n, _I64) for n in _SIZES] + [(n, _PTR) for n in (
        "pre", "indices", "p", "U1", "Ug", "B1t", "Bgt", "A2", "mixed", "V")]


class BackwardArgs(ctypes.Structure):
    """BackwardArgs<float, float>, field for field."""

    _fields_ = [(n, _I64) for n in _SIZES] + [(n, _PTR) for n in (
        "gm", "pre", "indices", "p", "U1", "Ug", "B1t", "Bgt", "A2", "g2", "grad_p", "grad_U1", "grad_Ug",
        "grad_B1t", "grad_Bgt", "grad_A2", "grad_pre", "mixed")] + [("shared_accumulators", ctypes.c_bool)]


def compiler_missing() -> str | None:
    return None if shutil.which("g++") else "no g++ on PATH to build the emulated GPU"


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The emulator, built once per source version into the temporary directory."""
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"dasam3_emulated_cuda_{digest}.so"
    if not path.exists():
        partial = path.with_suffix(f".{os.getpid()}.partial")
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
                        str(SOURCES[0]), "-o", str(partial)], check=True, capture_output=True, text=True)
        partial.replace(path)  # whole or not at all, for a concurrent test run
    lib = ctypes.CDLL(str(path))
    for name, args in (("emulated_forward", ForwardArgs), ("emulated_backward", BackwardArgs)):
        getattr(lib, name).argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(args)]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stacked(B: torch.Tensor, scale: float) -> torch.Tensor:
    """s · B [E, n, r] as [E, r, n] (B1t, Bgt of prepare_factors)."""
    return (B.transpose(1, 2) * scale).contiguous()


class _Sizes:
    def __init__(self, x, indices, W1, gate_weight, fc1_A, fc2_A, gate_A):
        any_A = next((A for A in (fc1_A, fc2_A, gate_A) if A is not None), None)
        self.T, self.D, self.F, self.k = x.shape[0], x.shape[1], W1.shape[0], indices.shape[1]
        self.E, self.r = (0, 0) if any_A is None else any_A.shape[:2]
        self.Er = self.E * self.r
        self.gated = gate_weight is not None
        self.fc1, self.fc2, self.gate = fc1_A is not None, fc2_A is not None, gate_A is not None
        self.pre_ld = 2 * self.F if self.gated else self.F
        self.u_ld = (int(self.fc1) + int(self.gate)) * self.Er

    def columns(self, U: torch.Tensor | None) -> tuple[int | None, int | None]:
        """Pointers to fc1's and the gate's columns of U (input_columns)."""
        if U is None:
            return None, None
        base, step = U.data_ptr(), U.element_size() * self.Er
        return (base if self.fc1 else None), (base + (step if self.fc1 else 0) if self.gate else None)


class EmulatedCudaOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, indices, weights, Wg, bg, W1, b1, W2, b2, Ag, Bg, A1, B1, A2, B2, scale, activation):
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"the emulated kernels run float32 on the CPU, got {x.dtype} on {x.device}")
        s = _Sizes(x, indices, W1, Wg, A1, A2, Ag)
        x, p, idx = x.contiguous(), weights.float().contiguous(), indices.long().contiguous()
        down = [A.reshape(s.Er, s.D) for A in (A1, Ag) if A is not None]
        A1s = torch.cat(down) if down else None
        U = x @ A1s.T if A1s is not None else None
        pre = x @ (W1.T if Wg is None else torch.cat([W1, Wg]).T)
        biases = [b if b is not None else torch.zeros(s.F) for b in ((b1, bg) if s.gated else (b1,))]
        if any(b is not None for b in (b1, bg)):
            pre = pre + torch.cat(biases)
        pre = pre.contiguous()
        B1t, Bgt = (_stacked(B, scale) if B is not None else None for B in (B1, Bg))
        A2c = A2.contiguous() if A2 is not None else None
        B2s = (B2.permute(1, 0, 2) * scale).reshape(s.D, s.Er) if B2 is not None else None
        mixed = torch.empty(s.T, s.F)
        V = torch.zeros(s.T, s.Er) if A2 is not None else None
        if s.T > 0 and s.F > 0:
            U1, Ug = s.columns(U)
            args = ForwardArgs(s.T, s.F, s.k, s.E, s.r, s.pre_ld, s.u_ld, pre.data_ptr(), idx.data_ptr(),
                               p.data_ptr(), U1, Ug, _ptr(B1t), _ptr(Bgt), _ptr(A2c), mixed.data_ptr(), _ptr(V))
            library().emulated_forward(ACTIVATIONS.index(activation), int(s.gated), ctypes.byref(args))
        y = mixed @ W2.T
        if V is not None:
            y = y + V @ B2s.T
        if b2 is not None:
            y = y + p.sum(1, keepdim=True) * b2
        ctx.save_for_backward(x, idx, p, Wg, W1, W2, b2, A1s, B1t, Bgt, A2c, B2s, pre, U, V)
        ctx.config = (s, scale, activation, Ag, Bg, A1, B1, A2, B2)
        return y

    @staticmethod
    def backward(ctx, g):
        x, idx, p, Wg, W1, W2, b2, A1s, B1t, Bgt, A2, B2s, pre, U, V = ctx.saved_tensors
        s, scale, activation, Ag, Bg, A1, B1, A2_param, B2 = ctx.config
        g = g.contiguous()
        gm, g2 = g @ W2, (g @ B2s if B2s is not None else None)
        grad_p = torch.zeros(s.T, s.k)
        grad_U = torch.zeros(s.T, s.u_ld) if s.u_ld else None
        grad_B1t, grad_Bgt, grad_A2 = (torch.zeros(s.Er, s.F) if adapted else None
                                       for adapted in (s.fc1, s.gate, s.fc2))
        grad_pre, mixed = torch.empty(s.T, s.pre_ld), torch.empty(s.T, s.F)
        adapted = int(s.fc1) + int(s.gate) + int(s.fc2)
        shared = adapted * s.Er * TILE * 4 <= library().shared_memory_limit()
        if s.T > 0 and s.F > 0:
            (U1, Ug), (gU1, gUg) = s.columns(U), s.columns(grad_U)
            args = BackwardArgs(s.T, s.F, s.k, s.E, s.r, s.pre_ld, s.u_ld, gm.data_ptr(), pre.data_ptr(),
                                idx.data_ptr(), p.data_ptr(), U1, Ug, _ptr(B1t), _ptr(Bgt), _ptr(A2), _ptr(g2),
                                grad_p.data_ptr(), gU1, gUg, _ptr(grad_B1t), _ptr(grad_Bgt), _ptr(grad_A2),
                                grad_pre.data_ptr(), mixed.data_ptr(), shared)
            library().emulated_backward(ACTIVATIONS.index(activation), int(s.gated), ctypes.byref(args))
        if b2 is not None:
            grad_p += (g @ b2).unsqueeze(1)
        pre_fc1, pre_gate = grad_pre[:, :s.F], grad_pre[:, s.F:]
        grad_x = pre_fc1 @ W1 + (pre_gate @ Wg if s.gated else 0) + (grad_U @ A1s if grad_U is not None else 0)

        def input_pair(columns: slice, grad_Bt, A, B):  # input_pair_grads
            if A is None:
                return None, None
            return ((grad_U[:, columns].T @ x).view_as(A),
                    (grad_Bt.view(s.E, s.r, s.F) * scale).transpose(1, 2).contiguous().view_as(B))

        gA1, gB1 = input_pair(slice(0, s.Er), grad_B1t, A1, B1)
        gAg, gBg = input_pair(slice(s.Er if s.fc1 else 0, None), grad_Bgt, Ag, Bg)
        gA2 = grad_A2.view(s.E, s.r, s.F) if grad_A2 is not None else None
        gB2 = (g.T @ V * scale).view(s.D, s.E, s.r).permute(1, 0, 2).contiguous() if V is not None else None
        frozen = {"W1": pre_fc1.T @ x, "b1": pre_fc1.sum(0), "W2": g.T @ mixed, "b2": g.T @ p.sum(1),
                  "Wg": pre_gate.T @ x if s.gated else None, "bg": pre_gate.sum(0) if s.gated else None}
        grads = (grad_x, None, grad_p, frozen["Wg"], frozen["bg"], frozen["W1"], frozen["b1"], frozen["W2"],
                 frozen["b2"], gAg, gBg, gA1, gB1, gA2, gB2, None, None)
        return tuple(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad))


def gated_moe(x, indices, weights, gate_weight, gate_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gate_A,
              gate_B, fc1_A, fc1_B, fc2_A, fc2_B, scale, activation):
    """The contract of `reference.gated_moe_reference` on the emulated CUDA kernels (float32)."""
    return EmulatedCudaOp.apply(x, indices, weights, gate_weight, gate_bias, fc1_weight, fc1_bias, fc2_weight,
                                fc2_bias, gate_A, gate_B, fc1_A, fc1_B, fc2_A, fc2_B, scale, activation)


def lowrank_moe(x, indices, weights, fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc1_A, fc1_B, fc2_A, fc2_B,
                scale, activation):
    """The contract of `reference.lowrank_moe_reference` on the emulated CUDA kernels (float32)."""
    return gated_moe(x, indices, weights, None, None, fc1_weight, fc1_bias, fc2_weight, fc2_bias, None, None,
                     fc1_A, fc1_B, fc2_A, fc2_B, scale, activation)

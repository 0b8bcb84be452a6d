"""Gated DA-MoE at a LLaMA-like FFN shape against the dense gated FFN and a MixLoRA-style mixture.

x [2, 512, 1024], F = 2816, silu, E = 4, k = 2, r = 8, the gate, fc1 and fc2 adapted.  Contenders:

* dense FFN (gated): `down(silu(gate(x)) ⊙ up(x))` on the frozen W0 (training step: the gradient of x).
* DAMoE gated (torch path): W_g x and W1 x once per token, W2 once on Σ_j p_j h_j, a hand-written backward.
* DAMoE gated (C++): the same layer on the fused C++ CPU kernel (backend "cpu", when it is built): both
  input products on each token tile, the per-token low-rank terms, activation and k-slot mix in one pass.
* MixLoRA-style: MixLoRA's algorithm (Li et al., 2024) on the same weights and routing: the base products
  W_g x and W1 x once per token, then per expert its tokens' low-rank terms, activation, and the down
  projection W2 (+ its LoRA) once per expert on that expert's (token, slot) pairs, combined by index_add.

Each contender's output is checked against the reference (the per-expert loop) before it is timed.

    python benchmarks/bench_gated.py --dtype fp32 [--dtype bf16] [--json benchmarks/results/gated_cpu.json]
    pytest benchmarks/ --benchmark -k gated
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dasam3.benchmark import Contender, hardware_name, page_faults_text, timed_run
from dasam3.layers import DAMoE
from dasam3_kernels import aux_losses, load_backend
from dasam3_kernels.activations import activation_fn

TORCH_PATH, FUSED = "DAMoE gated (torch)", "DAMoE gated (C++)"
LLAMA_SHAPE = dict(batch=2, tokens=512, d_model=1024, d_ff=2816, experts=4, top_k=2, rank=8, activation="silu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DenseGatedFFN(nn.Module):
    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, activation: str):
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, activation_fn(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class MixLoRAStyle(nn.Module):
    """MixLoRA's computation on a DAMoE layer's weights and router (so both compute the same function)."""

    def __init__(self, layer: DAMoE):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, s = self.layer, self.layer.scale
        tokens = x.reshape(-1, layer.d_model)
        indices, weights, probs = layer.router(tokens, None, load_backend("torch"))
        layer.aux = aux_losses(indices, probs) if self.training else {}  # MixLoRA balances its experts too
        base_g = F.linear(tokens, layer.gate.weight, layer.gate.bias)  # the base products, once per token
        base_u = F.linear(tokens, layer.fc1.weight, layer.fc1.bias)
        act = activation_fn(layer.activation)
        y = torch.zeros_like(tokens)
        for e in range(layer.num_experts):
            rows, slots = (indices == e).nonzero(as_tuple=True)
            xe = tokens[rows]
            g = base_g[rows] + s * F.linear(F.linear(xe, layer.gate_lora_A[e]), layer.gate_lora_B[e])
            u = base_u[rows] + s * F.linear(F.linear(xe, layer.fc1_lora_A[e]), layer.fc1_lora_B[e])
            h = act(g) * u
            out = F.linear(h, layer.fc2.weight, layer.fc2.bias) \
                + s * F.linear(F.linear(h, layer.fc2_lora_A[e]), layer.fc2_lora_B[e])  # W2 once per expert
            y = y.index_add(0, rows, weights[rows, slots, None].to(out.dtype) * out)
        return y.reshape(x.shape)


def build(dtype: torch.dtype, shape: dict = LLAMA_SHAPE, seed: int = 0) -> dict[str, Contender]:
    torch.manual_seed(seed)
    D, F_ = shape["d_model"], shape["d_ff"]
    gate, up, down = (nn.Linear(a, b, bias=False, dtype=dtype).requires_grad_(False)
                      for a, b in ((D, F_), (D, F_), (F_, D)))
    x = torch.randn(shape["batch"], shape["tokens"], D, dtype=dtype)
    grad = torch.randn_like(x)
    layer = DAMoE.from_ffn(up, down, shape["activation"], gate=gate, num_experts=shape["experts"],
                           top_k=shape["top_k"], rank=shape["rank"], backend="torch")
    with torch.no_grad():  # non-zero experts, so the correctness check sees every term
        for param in layer.expert_parameters():
            param.add_(0.02 * torch.randn_like(param))
    contenders = {
        "dense FFN": Contender("dense FFN", DenseGatedFFN(gate, up, down, shape["activation"]), x, grad),
        TORCH_PATH: Contender(TORCH_PATH, layer.train(), x, grad),
        "MixLoRA-style": Contender("MixLoRA-style", MixLoRAStyle(layer).train(), x, grad),
    }
    if fused_kernel_error() is None:
        contenders[FUSED] = Contender(FUSED, on_backend(layer, "cpu").train(), x, grad)
    return contenders


def fused_kernel_error() -> str | None:
    """None when the fused C++ kernel is built, else why its contender is left out."""
    try:
        load_backend("cpu")
    except RuntimeError as error:
        return str(error)
    return None


def on_backend(layer: DAMoE, backend: str) -> DAMoE:
    """A copy of `layer` (the same weights and router) that runs on `backend`."""
    twin = copy.deepcopy(layer)
    twin.backend = backend
    return twin


def check(contenders: dict[str, Contender]) -> dict[str, float]:
    """Max error relative to the reference's output scale, for the mixtures."""
    layer = contenders[TORCH_PATH].module
    reference = on_backend(layer, "reference").float()  # the same weights in fp32, on the per-expert loop
    x = contenders[TORCH_PATH].x[:, :128]  # the loop is slow: a slice of the tokens
    with torch.no_grad():
        expected = reference(x.float())
        return {name: ((contenders[name].module(x).float() - expected).abs().max() / expected.abs().max()).item()
                for name in contenders if name != "dense FFN"}


def run(dtype: torch.dtype, min_run_time: float = 2.0, clock: str = "wall") -> dict:
    contenders = build(dtype)
    if FUSED not in contenders:
        print(f"{FUSED} left out: {fused_kernel_error()}")
    timed = timed_run(contenders, check(contenders), min_run_time, torch.get_num_threads(), clock)
    return {"shape": LLAMA_SHAPE, "dtype": str(dtype).replace("torch.", ""), "hardware": hardware_name("cpu"),
            "threads": timed["threads"], "clock": clock, "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "python": platform.python_version(), "rows": timed["rows"]}


def format_rows(result: dict) -> str:
    lines = [f"gated FFN {LLAMA_SHAPE}, {result['dtype']} ({result['hardware']}, {result['threads']} threads)",
             f"{'contender':<22} {'forward ms':>11} {'x dense':>8} {'train ms':>10} {'x dense':>8} {'rel err':>9} "
             f"{'page faults/call':>17}"]
    for row in result["rows"]:
        error = "" if row["max_rel_error_vs_reference"] is None else f"{row['max_rel_error_vs_reference']:.1e}"
        lines.append(f"{row['name']:<22} {row['forward_ms']:>11.1f} {row['forward_ratio']:>7.2f}x "
                     f"{row['train_step_ms']:>10.1f} {row['train_step_ratio']:>7.2f}x {error:>9} "
                     f"{page_faults_text(row):>17}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="fp32 and/or bf16 (default both)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per contender and pass")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or the process's CPU time (less skewed by a loaded machine)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = [run(DTYPES[name], args.min_time, args.clock) for name in args.dtype or ("fp32", "bf16")]
    print("\n\n".join(format_rows(r) for r in results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Problems and comparisons shared by the kernel tests: every backend against the reference loop."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from dasam3_kernels import lowrank_moe_reference

# The device the conformance suite runs on: CPU in CI; the GPU check script sets DASAM3_TEST_DEVICE=cuda.
DEVICE = os.environ.get("DASAM3_TEST_DEVICE", "cpu")

LORA = ("fc1_A", "fc1_B", "fc2_A", "fc2_B")
FROZEN = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


@dataclass(frozen=True)
class Case:
    """One shape/routing configuration of the mixture-of-experts op."""

    tokens: int = 19
    d_model: int = 16
    d_ff: int = 40
    experts: int = 4
    top_k: int = 2
    rank: int = 4
    activation: str = "gelu"
    adapt: tuple[str, ...] = ("fc1", "fc2")
    bias: bool = True
    skew: bool = False  # every token's first choice is the same expert
    noncontiguous: bool = False
    dtype: torch.dtype = torch.float32
    scale: float = 1.5

    def __str__(self) -> str:
        changed = {k: v for k, v in self.__dict__.items() if v != Case.__dataclass_fields__[k].default}
        return ",".join(f"{k}={v}" for k, v in changed.items()) or "default"


EDGE_CASES = [
    Case(),
    Case(tokens=0),
    Case(tokens=1),
    Case(skew=True),
    Case(top_k=4),
    Case(rank=1),
    Case(d_model=13, d_ff=37, tokens=23),
    Case(noncontiguous=True),
    Case(experts=1, top_k=1),
    Case(experts=8, top_k=3, rank=2),
    Case(adapt=("fc1",)),
    Case(adapt=("fc2",)),
    Case(bias=False),
    Case(activation="gelu_tanh"),
    Case(activation="relu"),
    Case(activation="silu"),
]
LOW_PRECISION_CASES = [Case(dtype=torch.float16), Case(dtype=torch.bfloat16, skew=True)]
# Every edge case in both half types (SPEC section 2: 2e-2 against the fp32 reference).
HALF_EDGE_CASES = [replace(case, dtype=dtype) for dtype in (torch.bfloat16, torch.float16) for case in EDGE_CASES
                   if case != Case()]  # the default shape is in LOW_PRECISION_CASES


@dataclass
class Problem:
    """Inputs of `lowrank_moe(x, indices, weights, *FROZEN, *LORA, scale, activation)`."""

    case: Case
    x: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    tensors: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def args(self) -> tuple:
        return (self.x, self.indices, self.weights, *(self.tensors[n] for n in FROZEN + LORA),
                self.case.scale, self.case.activation)

    def differentiable(self) -> dict[str, torch.Tensor]:
        named = {"x": self.x, "weights": self.weights, **{n: self.tensors[n] for n in LORA}}
        return {n: t for n, t in named.items() if t is not None}

    def with_differentiable(self, values: dict[str, torch.Tensor]) -> "Problem":
        """A copy whose x, weights and lora factors are replaced by `values` (for gradcheck)."""
        tensors = {**self.tensors, **{n: v for n, v in values.items() if n in LORA}}
        return Problem(self.case, values.get("x", self.x), self.indices, values.get("weights", self.weights), tensors)

    def cast(self, dtype: torch.dtype) -> "Problem":
        """A detached copy in `dtype` (routing indices and fp32 routing weights unchanged)."""
        convert = lambda t: None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)  # noqa: E731
        return Problem(replace(self.case, dtype=dtype), convert(self.x), self.indices,
                       self.weights.detach().clone().requires_grad_(), {n: convert(t) for n, t in self.tensors.items()})


def make_problem(case: Case, device: str = DEVICE, seed: int = 0) -> Problem:
    """Random inputs with lora_B non-zero (the zero init would hide every fc-B gradient bug)."""
    gen = torch.Generator().manual_seed(seed)
    T, D, F, E, k, r = case.tokens, case.d_model, case.d_ff, case.experts, case.top_k, case.rank

    def rand(*shape, std=1.0, grad=False):
        t = (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=case.dtype)
        return t.requires_grad_(grad)

    if case.noncontiguous:  # every other column of a wider tensor
        x = rand(T, 2 * D)[:, ::2].detach().requires_grad_()
    else:
        x = rand(T, D, grad=True)
    logits = torch.randn(T, E, generator=gen)
    if case.skew:
        logits[:, E // 2] += 100.0
    indices = logits.topk(k, dim=-1).indices.to(device)
    weight_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32  # routing runs in fp32
    weights = torch.rand(T, k, generator=gen, dtype=weight_dtype).to(device).requires_grad_()  # any p
    tensors: dict[str, torch.Tensor | None] = {
        "fc1_weight": rand(F, D, std=D**-0.5),
        "fc1_bias": rand(F, std=0.1) if case.bias else None,
        "fc2_weight": rand(D, F, std=F**-0.5),
        "fc2_bias": rand(D, std=0.1) if case.bias else None,
    }
    for name, n_in, n_out in (("fc1", D, F), ("fc2", F, D)):
        adapted = name in case.adapt
        tensors[f"{name}_A"] = rand(E, r, n_in, std=n_in**-0.5, grad=True) if adapted else None
        tensors[f"{name}_B"] = rand(E, n_out, r, std=r**-0.5, grad=True) if adapted else None
    return Problem(case, x, indices, weights, tensors)


def forward_backward(op, problem: Problem, grad_out: torch.Tensor | None = None):
    """(y, grad_out, {name: gradient}) of `op` on `problem`."""
    y = op(*problem.args())
    if grad_out is None:
        grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    inputs = problem.differentiable()
    grads = torch.autograd.grad(y, list(inputs.values()), grad_out, allow_unused=True) if y.numel() else \
        [torch.zeros_like(t) for t in inputs.values()]
    return y, grad_out, dict(zip(inputs, grads))


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def assert_close(actual: torch.Tensor | None, expected: torch.Tensor | None, tol: float, what: str) -> None:
    """Max abs error within `tol` relative to the expected tensor's scale (SPEC section 2)."""
    if expected is None or expected.numel() == 0:
        assert actual is None or actual.numel() == 0 or actual.abs().max() == 0, what
        return
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.detach().double().abs().max().clamp_min(1e-12)
    error = (actual.detach().double() - expected.detach().double()).abs().max()
    assert error <= tol * scale, f"{what}: max error {error:.3g} > {tol} x scale {scale:.3g}"


def check_against_reference(op, case: Case, device: str = DEVICE) -> None:
    """Forward and every gradient of `op` against the fp32 reference on the same (rounded) inputs."""
    problem = make_problem(case, device)
    y, grad_out, grads = forward_backward(op, problem)
    oracle = problem.cast(torch.float32) if case.dtype != torch.float32 else problem.cast(torch.float64)
    y_ref, _, grads_ref = forward_backward(lowrank_moe_reference, oracle, grad_out.to(oracle.x.dtype))
    tol = tolerance(case.dtype)
    assert y.dtype == case.dtype and y.shape == (case.tokens, case.d_model)
    assert_close(y, y_ref, tol, f"{case}: output")
    for name, grad_ref in grads_ref.items():
        assert_close(grads[name], grad_ref, tol, f"{case}: d{name}")

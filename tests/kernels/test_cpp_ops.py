"""The compiled CPU kernels (`dasam3_kernels.cpp_ops`, csrc/damoe_cpu.cpp) beyond the conformance suite.

test_backends.py already runs backend "cpu" against the reference on the edge matrix (test_gated.py the
gated op); here: several tiles on several threads, the op contracts (opcheck, torch.compile), the layer
end to end, the frozen weights' gradients, every instruction-set variant, bad input, and the
missing-extension path, each for the plain and (`gated`) the gated FFN (SwiGLU/GeGLU).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dasam3.layers import DAMoE
from dasam3_kernels import backends, cpp_ops, load_backend, resolve_backend

from .cases import FROZEN, LORA, Case, assert_close, make_problem
from .ext_checks import MULTI_TILE_CASES, bwd_args, check_layer_against_reference, check_op_against_reference, \
    fwd_args, make_layers, op_and_args, run_layer
from .test_gated import GATE, GATE_LORA, GatedProblem

try:
    cpp_ops.cpu_variant()
    _MISSING = None
except RuntimeError as error:
    _MISSING = str(error)
needs_extension = pytest.mark.skipif(_MISSING is not None, reason=f"{_MISSING}")
ROOT = Path(__file__).resolve().parents[2]
gated_or_plain = pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])


@needs_extension
@gated_or_plain
@pytest.mark.parametrize("case", MULTI_TILE_CASES, ids=str)
def test_several_tiles_match_reference(case: Case, gated: bool):
    check_op_against_reference(case, gated)


@needs_extension
@gated_or_plain
@pytest.mark.parametrize("case", [Case(tokens=37, d_model=8, d_ff=20, experts=3, top_k=3, skew=True),
                                  Case(tokens=9, d_model=4, d_ff=24, experts=70, top_k=66, rank=1)],
                         ids=["k=E,skew,odd-tokens", "k=66"])
def test_slot_grouping_matches_reference(case: Case, gated: bool):
    """The per-token passes take four tokens' slots at a time, grouped by expert (for_each_expert_group in
    csrc/damoe_cpu.cpp): full groups where every token has every expert, a last group of one token, and
    above 64 slots per token (its bit mask) each slot alone."""
    check_op_against_reference(case, gated)


@needs_extension
@gated_or_plain
@pytest.mark.parametrize("half_gemm", ["1", "0"], ids=["half-gemm", "fp32-gemm"])
@pytest.mark.parametrize("case", [Case(dtype=torch.bfloat16), Case(dtype=torch.float16, skew=True),
                                  Case(dtype=torch.bfloat16, noncontiguous=True, activation="relu"),
                                  Case(dtype=torch.float16, tokens=1, adapt=("fc2",), bias=False),
                                  MULTI_TILE_CASES[3], replace(MULTI_TILE_CASES[1], dtype=torch.float16)], ids=str)
def test_both_half_type_gemm_paths_match_reference(monkeypatch, case: Case, half_gemm: str, gated: bool):
    """The kernel multiplies a half type natively only where the CPU can (bf16: AVX512-BF16/AMX, fp16:
    AVX512-FP16/AMX-FP16), else in fp32; DASAM3_CPU_HALF_GEMM forces each path on any CPU."""
    monkeypatch.setenv("DASAM3_CPU_HALF_GEMM", half_gemm)
    check_op_against_reference(case, gated)


@needs_extension
@gated_or_plain
def test_result_does_not_depend_on_thread_count(gated: bool):
    op, args = op_and_args(MULTI_TILE_CASES[0], gated)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = op(*args)
        torch.set_num_threads(2)
        double = op(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(double, single, rtol=1e-5, atol=1e-6)


@needs_extension
@gated_or_plain
@pytest.mark.parametrize("case", [Case(), Case(adapt=("fc1",), bias=False), Case(adapt=("fc2",)),
                                  Case(adapt=(), activation="relu"), Case(dtype=torch.float16, tokens=5)], ids=str)
@pytest.mark.parametrize("save", [True, False])
def test_forward_op_contract(case: Case, save: bool, gated: bool):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch checks them."""
    torch.library.opcheck(torch.ops.dasam3.lowrank_moe_fwd.default, fwd_args(case, "cpu", save, gated))


@needs_extension
@gated_or_plain
@pytest.mark.parametrize("case", [Case(), Case(adapt=("fc1",), bias=False), Case(adapt=("fc2",))], ids=str)
@pytest.mark.parametrize("need_fc", [True, False])
def test_backward_op_contract(case: Case, need_fc: bool, gated: bool):
    torch.library.opcheck(torch.ops.dasam3.lowrank_moe_bwd.default, bwd_args(case, "cpu", need_fc, gated))


@needs_extension
@gated_or_plain
def test_compiles_without_graph_break(gated: bool):
    op, args = op_and_args(Case(), gated)
    compiled = torch.compile(op, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), op(*args))


def _compiled_matches_eager(model: torch.nn.Module, inputs: list[torch.Tensor]) -> None:
    """torch.compile(dynamic=True, fullgraph=True) of `model` on inputs of several shapes: one graph,
    the eager outputs and the gradients of every trainable parameter."""
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    params = [p for p in model.parameters() if p.requires_grad]
    for x in inputs:
        expected = model(x)
        expected_grads = torch.autograd.grad(expected.square().sum(), params)
        actual = compiled(x)
        actual_grads = torch.autograd.grad(actual.square().sum(), params)
        assert_close(actual, expected, 1e-5, "compiled output")
        for got, want in zip(actual_grads, expected_grads):
            assert_close(got, want, 1e-5, "compiled gradient")


@needs_extension
@gated_or_plain
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_layer_compiles_with_dynamic_shapes_in_one_graph(backend: str, gated: bool):
    """Also with "auto" resolved for the first time inside the trace: the backend loads eagerly there
    (a library load and PyTorch's CPU-capability query are no graph ops)."""
    torch.manual_seed(0)
    layer = DAMoE(16, 24, backend=backend, context_dim=0, gated=gated)
    with torch.no_grad():
        for param in layer.expert_parameters():
            param.normal_(0.0, 0.3)
    backends.forget_loaded()
    _compiled_matches_eager(layer, [torch.randn(2, 5, 16), torch.randn(3, 7, 16)])


@needs_extension
@pytest.mark.parametrize("model", ["swin", "vit"])
def test_patched_timm_model_compiles_with_dynamic_shapes_in_one_graph(model: str):
    """timm's Swin (window partitions: symbolic token counts) and ViT with their FFNs patched onto the
    "cpu" backend: before the fixes, Swin failed with "sources must not be empty for symbol" and ViT
    broke the graph on the backend lookup's CPU-capability query."""
    timm = pytest.importorskip("timm")
    from dasam3.layers import patch_ffn

    torch.manual_seed(0)
    if model == "swin":
        net = timm.models.swin_transformer.SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=16,
                                                           depths=(1, 1), num_heads=(2, 2), num_classes=3)
    else:
        net = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=2,
                                                               num_heads=2, num_classes=3)
    assert len(patch_ffn(net, backend="cpu")) == 2
    _compiled_matches_eager(net.eval(), [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)])


@needs_extension
@pytest.mark.parametrize("config", [
    {"skew": False},
    {"skew": True},
    {"skew": True, "context_dim": 6, "activation": "relu", "num_experts": 5, "top_k": 3},
    {"adapt": ("fc1",), "bias": False, "activation": "silu", "rank": 3},
], ids=["balanced", "skewed", "context-relu", "fc1-only"])
@gated_or_plain
def test_layer_matches_reference(config: dict, gated: bool):
    check_layer_against_reference("cpu", d_model=24, d_ff=40, gated=gated, **config)


@needs_extension
@gated_or_plain
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_under_autocast(dtype: torch.dtype, gated: bool):
    """Forward and backward inside the caller's autocast: the kernels' own GEMMs must not be recast."""
    layer, reference = make_layers("cpu", d_model=16, d_ff=48, context_dim=4, gated=gated)
    x, context, grad_y = torch.randn(2, 9, 16), torch.randn(2, 4), torch.randn(2, 9, 16)
    y_ref, grads_ref = run_layer(reference, x, context, grad_y)
    with torch.autocast("cpu", dtype=dtype):
        y, grads = run_layer(layer, x, context, grad_y)
    assert y.dtype == dtype
    assert_close(y, y_ref, 2e-2, "output")
    projections = ("gate", "fc1", "fc2") if gated else ("fc1", "fc2")
    lora = [f"{n}_lora_{f}" for n in projections for f in ("A", "B")]
    for name in ("x", "context", *lora, "router.token_proj.weight"):
        assert_close(grads[name], grads_ref[name], 2e-2, f"d{name}")


@needs_extension
def test_layer_auto_backend_runs_the_kernel():
    assert resolve_backend("auto", torch.device("cpu")).name == "cpu"
    layer = DAMoE(8, 16)
    assert layer(torch.randn(2, 3, 8)).shape == (2, 3, 8)


@needs_extension
def test_auto_picks_per_compute_dtype(monkeypatch):
    """`auto` follows its per-dtype table with the dtype the layer computes in (autocast's, else x's)."""
    ran = []
    for name in ("cpu", "torch"):
        backend = load_backend(name)
        spy = functools.partial(_record, ran, name, backend.lowrank_moe)
        monkeypatch.setitem(backends._LOADED, name, dataclasses.replace(backend, lowrank_moe=spy))
    monkeypatch.setitem(backends._CPU_AUTO_ORDER, torch.bfloat16, ("torch", "cpu"))
    monkeypatch.setitem(backends._CPU_AUTO_ORDER, torch.float32, ("cpu", "torch"))
    layer, x = DAMoE(8, 16), torch.randn(2, 3, 8)
    layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    layer.to(torch.bfloat16)(x.bfloat16())
    assert ran == [("cpu", torch.float32), ("torch", torch.bfloat16), ("torch", torch.bfloat16)]


def _record(ran: list, name: str, op, x, *args, **kwargs):
    ran.append((name, x.dtype))
    return op(x, *args, **kwargs)


@needs_extension
@gated_or_plain
def test_unfrozen_ffn_gets_the_reference_gradients(gated: bool):
    """The fc weights are frozen by the layer, but a user may unfreeze them: the op differentiates them too
    (gated: the gate's weights as well)."""
    layer, reference = make_layers("cpu", d_model=12, d_ff=20, gated=gated)
    projections = ("gate", "fc1", "fc2") if gated else ("fc1", "fc2")
    for model in (layer, reference):
        for name in projections:
            getattr(model, name).requires_grad_(True)
    x, grad_y = torch.randn(2, 9, 12), torch.randn(2, 9, 12)
    y, grads = run_layer(layer, x, None, grad_y)
    y_ref, grads_ref = run_layer(reference, x, None, grad_y)
    assert_close(y, y_ref, 1e-4, "output")
    for name in (f"{n}.{w}" for n in projections for w in ("weight", "bias")):
        assert_close(grads[name], grads_ref[name], 1e-4, f"d{name}")


@needs_extension
def test_backward_of_a_forward_without_saved_state_is_refused():
    problem = make_problem(Case(), "cpu")
    y = torch.ops.dasam3.lowrank_moe_fwd(*problem.args(), False)[0]
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        y.sum().backward()


@needs_extension
def test_dropout_is_refused():
    problem = make_problem(Case(), "cpu")
    keep = torch.ones(problem.case.tokens, problem.case.top_k, problem.case.d_ff, dtype=torch.bool)
    with pytest.raises(ValueError, match="no dropout"):
        cpp_ops.lowrank_moe(*problem.args(), dropout_mask=keep, dropout_p=0.1)


@needs_extension
@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(fc1_B=None), "fc1_A and fc1_B must be given together"),
    (lambda a: a.update(fc2_weight=a["fc2_weight"][:, :-1]),
     r"fc2_weight must be \[d_model, d_ff\] = \[16, 40\], got \[16, 39\]"),
    (lambda a: a.update(indices=a["indices"] + 3), r"indices must lie in \[0, 4\), got values in \[3, 6\]"),
    (lambda a: a.update(fc1_A=a["fc1_A"].double()), "fc1_A must have x's dtype Float, got Double"),
    (lambda a: a.update(activation="tanh"),
     "activation must be one of gelu, gelu_tanh, relu, silu, quick_gelu, got 'tanh'"),
])
def test_bad_input_names_expected_and_received(change, message):
    problem = make_problem(Case(), "cpu")
    names = ["x", "indices", "weights", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "fc1_A", "fc1_B",
             "fc2_A", "fc2_B", "scale", "activation"]
    args = dict(zip(names, problem.args()))
    change(args)
    with pytest.raises(RuntimeError, match=message):
        cpp_ops.lowrank_moe(*args.values())


@needs_extension
@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(gate_weight=a["gate_weight"][:-1]),
     r"gate_weight must be \[d_ff, d_model\] = \[40, 16\], got \[39, 16\]"),
    (lambda a: a.update(gate_B=None), "gate_A and gate_B must be given together, got only A"),
    (lambda a: a.update(gate_B=a["gate_B"][:, :-1]),
     r"gate_B must be \[experts, d_ff, rank\] = \[4, 40, 4\], got \[4, 39, 4\]"),
    (lambda a: a.update(gate_bias=a["gate_bias"].double()), "gate_bias must have x's dtype Float, got Double"),
    (lambda a: a.update(gate_weight=None), "gate_bias, gate_A and gate_B belong to a gated FFN: they need gate_weight"),
])
def test_bad_gate_input_names_expected_and_received(change, message):
    problem = GatedProblem(Case())
    names = ["x", "indices", "weights", *GATE, *FROZEN, *GATE_LORA, *LORA, "scale", "activation"]
    args = dict(zip(names, problem.args()))
    change(args)
    plain = [args[n] for n in ("x", "indices", "weights", *FROZEN, *LORA, "scale", "activation")]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dasam3.lowrank_moe_fwd(*plain, False, *(args[n] for n in GATE + GATE_LORA))


@pytest.mark.parametrize("variant", ["avx2", "default"])
def test_instruction_set_variant_matches_reference(variant: str):
    """Each library variant (the CI machine would otherwise only ever load its best one), in a process
    whose PyTorch CPU capability is lowered the way ATen's own kernels are."""
    if cpp_ops._library_path(f"_C_cpu_{variant}") is None:
        pytest.skip(f"no {variant} library is built on this platform")
    script = (
        "from dasam3_kernels import cpp_ops, load_backend\n"
        "from tests.kernels.cases import EDGE_CASES, Case, check_against_reference\n"
        "from tests.kernels.test_gated import check_gated\n"
        f"assert cpp_ops.cpu_variant() == {variant!r}, cpp_ops.cpu_variant()\n"
        "for case in EDGE_CASES[:4] + [Case(tokens=150, d_model=12, d_ff=1000, rank=3, activation='silu')]:\n"
        "    check_against_reference(load_backend('cpu').lowrank_moe, case, device='cpu')\n"
        "    check_gated(load_backend('cpu').gated_moe, case)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": variant}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_missing_extension_says_how_to_build(monkeypatch, tmp_path):
    """Simulated with an empty package directory: a named backend raises, "auto" falls back to torch."""
    monkeypatch.setattr(cpp_ops, "_PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(cpp_ops, "cpu_variant", cpp_ops.cpu_variant.__wrapped__)
    monkeypatch.setattr(cpp_ops, "load_cuda", cpp_ops.load_cuda.__wrapped__)
    backends.forget_loaded()
    try:
        for name in ("cpu", "cuda"):
            with pytest.raises(RuntimeError, match=rf"backend '{name}' is not available: .*not built.*"
                                                   r"pip install -e \. --no-build-isolation"):
                load_backend(name)
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
            DAMoE(8, 16, backend="cpu")
        assert resolve_backend("auto", torch.device("cpu")).name == "torch"
        assert DAMoE(8, 16)(torch.randn(3, 8)).shape == (3, 8)
    finally:
        backends.forget_loaded()

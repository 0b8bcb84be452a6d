"""The DAMoE layer against the SPEC: forward/gradients vs the reference, init, variants, edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dasam3.layers import DAMoE
from dasam3_kernels import available_backends, gated_moe_reference, lowrank_moe_reference

from ..kernels.cases import assert_close

FAST_BACKENDS = [name for name in available_backends("cpu") if name != "reference"]


def perturbed(layer: DAMoE, seed: int = 1) -> DAMoE:
    """Non-zero lora_B factors and a non-trivial router, so that no gradient is trivially zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.expert_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=gen).to(param))
        for param in layer.router.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen).to(param))
    return layer


def twin(layer: DAMoE, backend: str) -> DAMoE:
    """The same layer (same weights) running another backend."""
    kwargs = dict(num_experts=layer.num_experts, top_k=layer.top_k, rank=layer.rank, alpha=layer.alpha,
                  activation=layer.activation, context_dim=layer.context_dim, dropout=layer.dropout,
                  adapt=layer.adapt, router=layer.router_type, expert_type=layer.expert_type,
                  bias=layer.fc1.bias is not None, gated=layer.gated, dtype=layer.fc1.weight.dtype)
    other = DAMoE(layer.d_model, layer.d_ff, backend=backend, **kwargs)
    other.load_state_dict(layer.state_dict())
    return other.train(layer.training)


def outputs_and_grads(layer: DAMoE, x: torch.Tensor, context: torch.Tensor | None, call=None):
    """y and the gradients of a fixed loss; `call` runs the layer instead of `layer` (a compiled one)."""
    x = x.detach().clone().requires_grad_()
    context = None if context is None else context.detach().clone().requires_grad_()
    y = (layer if call is None else call)(x, context)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + layer.aux["balance"] + layer.aux["sparse"]
    leaves = {"x": x, **({"context": context} if context is not None else {}),
              **{n: p for n, p in layer.named_parameters() if p.requires_grad}}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return y, dict(zip(leaves, grads))


def assert_matches(layer: DAMoE, reference: DAMoE, x: torch.Tensor, context: torch.Tensor | None = None,
                   tol: float = 1e-4, call=None, seed: int = 3) -> None:
    """Output and every gradient of `layer` (or `call`) against `reference` on the same input (and, through
    the same seed, the same dropout mask)."""
    torch.manual_seed(seed)
    y, grads = outputs_and_grads(layer, x, context, call)
    torch.manual_seed(seed)
    y_ref, grads_ref = outputs_and_grads(reference, x, context)
    assert_close(y, y_ref, tol, "output")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], tol, f"d{name}")


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("layout", ["batched-per-sample-context", "flat-per-token-context", "no-context"])
def test_backend_matches_reference_layer(backend: str, layout: str):
    context_dim = 0 if layout == "no-context" else 6
    layer = perturbed(DAMoE(16, 40, num_experts=4, top_k=2, rank=4, alpha=8, context_dim=context_dim,
                            backend="reference"))
    x = torch.randn(3, 5, 16) if layout != "flat-per-token-context" else torch.randn(11, 16)
    context = None if not context_dim else torch.randn(x.shape[0], context_dim)
    y_ref, grads_ref = outputs_and_grads(layer, x, context)
    y, grads = outputs_and_grads(twin(layer, backend), x, context)
    assert_close(y, y_ref, 1e-4, "output")
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], 1e-4, f"d{name}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_layer_float64_gradcheck(backend: str):
    layer = perturbed(DAMoE(6, 10, num_experts=3, top_k=2, rank=2, context_dim=4, backend=backend,
                            dtype=torch.float64))
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.fc1_lora_A, layer.fc2_lora_B, layer.router.token_proj.weight, layer.router.context_proj.weight]

    def fn(x, context, *_):
        return layer(x, context)

    assert torch.autograd.gradcheck(fn, (x, context, *params))


@pytest.mark.parametrize("activation,torch_act", [("gelu", nn.GELU()), ("relu", nn.ReLU()),
                                                  ("gelu_tanh", nn.GELU("tanh")), ("silu", nn.SiLU())])
def test_from_ffn_reproduces_the_wrapped_ffn(activation: str, torch_act: nn.Module):
    fc1, fc2 = nn.Linear(12, 30), nn.Linear(30, 12)
    layer = DAMoE.from_ffn(fc1, fc2, activation=activation, context_dim=3)
    assert layer.fc1 is fc1 and layer.fc2 is fc2
    assert not any(p.requires_grad for p in (*fc1.parameters(), *fc2.parameters()))
    x = torch.randn(4, 7, 12)
    expected = fc2(torch_act(fc1(x)))
    assert_close(layer.train()(x, torch.randn(4, 3)), expected, 1e-5, "train mode")
    assert_close(layer.eval()(x, torch.randn(4, 3)), expected, 1e-5, "eval mode")


def test_from_ffn_reproduces_transformer_encoder_layer_ffn():
    block = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=48, dropout=0.0, batch_first=True)
    layer = DAMoE.from_ffn(block.linear1, block.linear2, activation="relu")
    x = torch.randn(2, 5, 16)
    assert_close(layer(x), block._ff_block(x), 1e-5, "TransformerEncoderLayer FFN")


def test_from_ffn_rejects_mismatched_modules():
    with pytest.raises(ValueError, match=r"d_ff=30.*\[12, 31\]"):
        DAMoE.from_ffn(nn.Linear(12, 30), nn.Linear(31, 12))
    with pytest.raises(ValueError, match="d_model"):
        DAMoE.from_ffn(nn.Linear(12, 30), nn.Linear(30, 12), d_model=12)


def test_initialisation_follows_the_spec():
    layer = DAMoE(64, 96, num_experts=3, rank=5, context_dim=7)
    for A, fan_in in ((layer.fc1_lora_A, 64), (layer.fc2_lora_A, 96)):
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert 0.9 * bound < A.abs().max() <= bound
        assert abs(A.std().item() - bound / math.sqrt(3)) < 0.1 * bound
        assert not torch.allclose(A[0], A[1])  # drawn independently per expert
    assert (layer.fc1_lora_B == 0).all() and (layer.fc2_lora_B == 0).all()
    assert abs(layer.router.token_proj.weight.std().item() - 0.02) < 0.005
    assert (layer.router.token_proj.bias == 0).all()
    assert layer.router.context_proj.bias is None
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "fc1.weight": (96, 64), "fc1.bias": (96,), "fc2.weight": (64, 96), "fc2.bias": (64,),
        "fc1_lora_A": (3, 5, 64), "fc1_lora_B": (3, 96, 5), "fc2_lora_A": (3, 5, 96), "fc2_lora_B": (3, 64, 5),
        "router.token_proj.weight": (3, 64), "router.token_proj.bias": (3,),
        "router.context_proj.weight": (3, 7),
    }
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == set(shapes) - {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_one_optimizer_step_moves_the_zero_initialised_factors():
    layer = DAMoE(16, 32, context_dim=4)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    y = layer(torch.randn(2, 6, 16), torch.randn(2, 4))
    (y.pow(2).mean() + layer.aux["balance"]).backward()
    assert layer.fc1_lora_B.grad.abs().max() > 0 and layer.fc2_lora_B.grad.abs().max() > 0
    optimizer.step()
    assert layer.fc1_lora_B.abs().max() > 0 and layer.fc2_lora_B.abs().max() > 0


def test_single_expert_equals_peft_lora():
    peft = pytest.importorskip("peft")
    ffn = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16))
    layer = perturbed(DAMoE.from_ffn(ffn[0], ffn[2], num_experts=1, top_k=1, rank=4, alpha=12))
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0", "2"], lora_dropout=0.0)
    wrapped = peft.get_peft_model(ffn, config)
    with torch.no_grad():
        for index, name in ((0, "fc1"), (2, "fc2")):
            module = wrapped.base_model.model[index]
            module.lora_A["default"].weight.copy_(getattr(layer, f"{name}_lora_A")[0])
            module.lora_B["default"].weight.copy_(getattr(layer, f"{name}_lora_B")[0])
    x = torch.randn(3, 8, 16)
    assert_close(layer(x), wrapped(x), 1e-5, "DAMoE(E=1, k=1) vs PEFT LoRA")


def test_aux_losses_match_an_independent_formula_and_transformers():
    layer = perturbed(DAMoE(16, 32, num_experts=5, top_k=2, context_dim=3)).train()
    x, context = torch.randn(4, 6, 16), torch.randn(4, 3)
    layer(x, context)
    logits = (layer.router.token_proj(x) + layer.router.context_proj(context)[:, None]).reshape(-1, 5)
    probs = logits.softmax(-1)
    chosen = logits.topk(2, -1).indices
    balance = 0.0
    for slot in range(2):
        for expert in range(5):
            balance += (chosen[:, slot] == expert).float().mean() * probs[:, expert].mean()
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert_close(layer.aux["balance"], 5 * balance, 1e-5, "balance")
    assert_close(layer.aux["sparse"], entropy, 1e-5, "sparse")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    assert_close(layer.aux["balance"], mixtral.load_balancing_loss_func((logits,), 5, 2), 1e-5, "transformers")
    layer.eval()(x, context)
    assert layer.aux == {}


def test_aux_loss_sums_layers_that_ran_and_carries_gradient():
    from dasam3.layers import aux_loss

    first, second = DAMoE(8, 16), DAMoE(8, 16)
    model = nn.ModuleList([first, second])
    assert aux_loss(model).item() == 0.0
    x = torch.randn(10, 8)
    first(x)
    expected = 0.01 * first.aux["balance"] + 0.001 * first.aux["sparse"]
    assert_close(aux_loss(model), expected, 1e-6, "one layer ran")
    second(x)
    total = aux_loss(model, balance=0.5, sparse=0.25)
    expected = sum(0.5 * m.aux["balance"] + 0.25 * m.aux["sparse"] for m in (first, second))
    assert_close(total, expected, 1e-6, "two layers ran")
    total.backward()
    assert first.router.token_proj.weight.grad.abs().max() > 0


def test_last_routing_is_detached_and_consistent():
    layer = perturbed(DAMoE(8, 16, num_experts=4, top_k=3)).eval()
    layer(torch.randn(2, 5, 8))
    routing = layer.last_routing
    assert routing["indices"].shape == (10, 3) and routing["probs"].shape == (10, 4)
    assert not any(t.requires_grad for t in routing.values())
    assert torch.allclose(routing["weights"].sum(-1), torch.ones(10))
    top_probs = routing["probs"].gather(1, routing["indices"])
    assert torch.allclose(routing["weights"], top_probs / top_probs.sum(-1, keepdim=True), atol=1e-6)


def test_random_router_draws_distinct_experts_with_equal_weights():
    layer = perturbed(DAMoE(8, 16, num_experts=5, top_k=3, router="random"))
    assert not list(layer.router.parameters())
    x = torch.randn(50, 8)
    y = layer(x)
    indices, weights = layer.last_routing["indices"], layer.last_routing["weights"]
    assert all(len(set(row.tolist())) == 3 for row in indices)
    assert torch.all(weights == 1 / 3)
    assert indices.unique().numel() == 5  # uniform over experts, all of them drawn
    expected = lowrank_moe_reference(x, indices, weights, layer.fc1.weight, layer.fc1.bias, layer.fc2.weight,
                                     layer.fc2.bias, layer.fc1_lora_A, layer.fc1_lora_B, layer.fc2_lora_A,
                                     layer.fc2_lora_B, layer.scale, "gelu")
    assert_close(y, expected, 1e-5, "random router output")


def test_full_experts_start_as_the_ffn_and_match_the_reference():
    fc1, fc2 = nn.Linear(8, 20), nn.Linear(20, 8)
    layer = DAMoE.from_ffn(fc1, fc2, expert_type="full", num_experts=3, context_dim=2)
    x, context = torch.randn(2, 4, 8), torch.randn(2, 2)
    assert_close(layer(x, context), fc2(F.gelu(fc1(x))), 1e-5, "full experts at init")
    assert {n for n, _ in layer.named_parameters()} >= {"expert_fc1_weight", "expert_fc1_bias",
                                                         "expert_fc2_weight", "expert_fc2_bias"}
    assert layer.expert_fc1_weight.shape == (3, 20, 8) and layer.expert_fc1_weight.requires_grad
    perturbed(layer)
    y_ref, grads_ref = outputs_and_grads(twin(layer, "reference"), x, context)
    y, grads = outputs_and_grads(twin(layer, "torch"), x, context)
    assert_close(y, y_ref, 1e-4, "output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], 1e-4, f"d{name}")


def test_dropout_is_per_slot_in_training_and_off_in_eval():
    layer = perturbed(DAMoE(8, 32, dropout=0.4, backend="reference"))
    x, fast = torch.randn(6, 8), twin(layer, "torch")
    torch.manual_seed(7)
    y_ref, grads_ref = outputs_and_grads(layer, x, None)
    torch.manual_seed(7)
    y, grads = outputs_and_grads(fast, x, None)
    assert_close(y, y_ref, 1e-5, "same mask, same output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], 1e-4, f"d{name}")
    no_dropout = twin(layer, "torch")
    no_dropout.dropout = 0.0
    assert not torch.allclose(y, no_dropout(x))
    layer.eval()
    assert_close(layer(x), no_dropout.eval()(x), 1e-6, "eval mode ignores dropout")


@pytest.mark.parametrize(
    "shape,context_rows",
    [((0, 16), 0), ((2, 0, 16), 2), ((1, 16), 1), ((1, 1, 16), 1), ((3, 2, 4, 16), 3)],
    ids=["0-tokens", "0-tokens-batched", "1-token", "1-token-batched", "4d-input"],
)
def test_token_count_edge_cases(shape, context_rows):
    layer = perturbed(DAMoE(16, 24, context_dim=3))
    x, context = torch.randn(*shape), torch.randn(context_rows, 3)
    y, grads = outputs_and_grads(layer, x, context)
    y_ref, grads_ref = outputs_and_grads(twin(layer, "reference"), x, context)
    assert y.shape == x.shape
    assert_close(y, y_ref, 1e-4, "output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], 1e-4, f"d{name}")


@pytest.mark.parametrize(
    "kwargs,make_input",
    [
        (dict(num_experts=4, top_k=4), lambda: torch.randn(9, 16)),
        (dict(rank=1), lambda: torch.randn(9, 16)),
        (dict(num_experts=1, top_k=1), lambda: torch.randn(9, 16)),
        (dict(), lambda: torch.randn(16, 9).t()),  # non-contiguous
        (dict(activation="silu", adapt=("fc2",)), lambda: torch.randn(9, 16)),
        (dict(bias=False, activation="relu"), lambda: torch.randn(9, 16)),
    ],
    ids=["k=E", "rank-1", "E=1", "non-contiguous", "fc2-only", "no-bias"],
)
def test_configuration_edge_cases(kwargs, make_input):
    layer = perturbed(DAMoE(16, 24, **kwargs))
    x = make_input()
    y, grads = outputs_and_grads(layer, x, None)
    y_ref, grads_ref = outputs_and_grads(twin(layer, "reference"), x, None)
    assert_close(y, y_ref, 1e-4, "output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], 1e-4, f"d{name}")


def test_odd_sizes_and_all_tokens_to_one_expert():
    layer = perturbed(DAMoE(13, 37, num_experts=3, context_dim=2))
    with torch.no_grad():
        layer.router.token_proj.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    x, context = torch.randn(3, 7, 13), torch.randn(3, 2)
    y, grads = outputs_and_grads(layer, x, context)
    assert (layer.last_routing["indices"][:, 0] == 1).all()
    y_ref, grads_ref = outputs_and_grads(twin(layer, "reference"), x, context)
    assert_close(y, y_ref, 1e-4, "output")
    for name in grads_ref:
        assert_close(grads[name], grads_ref[name], 1e-4, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_low_precision_under_cpu_autocast(dtype, gated):
    layer = perturbed(DAMoE(16, 48, context_dim=4, gated=gated, activation="silu" if gated else "gelu"))
    x, context = torch.randn(2, 9, 16), torch.randn(2, 4)
    y_ref, grads_ref = outputs_and_grads(twin(layer, "reference"), x, context)
    with torch.autocast("cpu", dtype=dtype):
        y, grads = outputs_and_grads(layer, x, context)
    assert y.dtype == dtype
    assert_close(y, y_ref, 2e-2, "output")
    gate = ("gate_lora_A", "gate_lora_B") if gated else ()
    for name in ("x", *gate, "fc1_lora_A", "fc2_lora_B", "router.token_proj.weight"):
        assert_close(grads[name], grads_ref[name], 2e-2, f"d{name}")


def test_low_precision_weights():
    layer = perturbed(DAMoE(16, 48)).to(torch.bfloat16)
    x = torch.randn(20, 16, dtype=torch.bfloat16)
    reference = twin(layer, "reference").float()
    assert_close(layer(x), reference(x.float()), 2e-2, "bf16 layer")


def test_state_dict_round_trip():
    layer = perturbed(DAMoE(16, 24, context_dim=3, num_experts=3))
    state = layer.state_dict()
    fresh = DAMoE(16, 24, context_dim=3, num_experts=3)
    fresh.load_state_dict(state)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 3)
    assert torch.equal(fresh(x, context), layer(x, context))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(top_k=0), r"top_k must be in \[1, num_experts=4\], got 0"),
        (dict(top_k=5), r"top_k must be in \[1, num_experts=4\], got 5"),
        (dict(rank=0), r"rank must be >= 1, got 0"),
        (dict(activation="tanh"), r"activation must be one of .*'gelu'.*got 'tanh'"),
        (dict(router="hash"), r"router must be one of .*'learned'.*got 'hash'"),
        (dict(expert_type="dense"), r"expert_type must be one of .*'lowrank'.*got 'dense'"),
        (dict(backend="mlx"), r"backend must be one of .*'torch'.*got 'mlx'"),
        (dict(adapt=("fc3",)), r"adapt must be a subset of .*got \('fc3',\)"),
        (dict(adapt=("gate", "fc1")), r"adapt must be a subset of \('fc1', 'fc2'\) \('gate' needs gated=True\)"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_configuration_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DAMoE(16, 24, **kwargs)


def test_bad_input_is_a_value_error_naming_expected_and_received():
    layer = DAMoE(16, 24, context_dim=3)
    with pytest.raises(ValueError, match=r"d_model=16, got shape \(2, 5, 15\)"):
        layer(torch.randn(2, 5, 15), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"context of shape \[B or T, 3\] is required.*got None"):
        layer(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"one row per sample \(B=2\) or per token \(T=10\), got 4 rows"):
        layer(torch.randn(2, 5, 16), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"context must be \[B or T, 3\], got shape \(2, 4\)"):
        layer(torch.randn(2, 5, 16), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"context given \(shape \(2, 3\)\) but the layer has context_dim=0"):
        DAMoE(16, 24)(torch.randn(2, 5, 16), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"dtype torch.float64 but the layer's weights are torch.float32"):
        layer(torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3))


def test_per_token_context_rows_are_accepted_for_batched_input():
    layer = perturbed(DAMoE(16, 24, context_dim=3))
    x, per_sample = torch.randn(2, 5, 16), torch.randn(2, 3)
    per_token = per_sample.repeat_interleave(5, dim=0)
    assert_close(layer(x, per_token), layer(x, per_sample), 1e-6, "per-token == broadcast per-sample")


@pytest.fixture
def loaders(monkeypatch):
    """The backend loaders, patchable; the load cache is cleared before and after."""
    from dasam3_kernels import backends

    backends.forget_loaded()
    yield lambda name, loader: monkeypatch.setitem(backends._LOADERS, name, loader)
    backends.forget_loaded()


def test_unavailable_named_backend_is_a_runtime_error_and_auto_never_raises(loaders):
    attempts = []

    def missing():
        attempts.append(1)
        raise RuntimeError("backend 'cpu' is not available: the extension is not built (how to build it)")

    loaders("cpu", missing)
    with pytest.raises(RuntimeError, match="not available.*build"):
        DAMoE(16, 24, backend="cpu")
    layer = DAMoE(16, 24, backend="auto")
    for _ in range(3):
        assert layer(torch.randn(3, 16)).shape == (3, 16)
    assert len(attempts) == 1  # the failed load is remembered, not retried on every forward


def test_named_backend_on_the_wrong_device_is_a_runtime_error(loaders):
    from dasam3_kernels.backends import Backend

    loaders("cpu", lambda: Backend("cpu", lowrank_moe_reference, gated_moe_reference,
                                        device_error=lambda device: "needs a GPU"))
    layer = DAMoE(16, 24, backend="cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cpu' cannot run on cpu: needs a GPU"):
        layer(torch.randn(3, 16))
    assert DAMoE(16, 24, backend="auto")(torch.randn(3, 16)).shape == (3, 16)


# -- gated experts (SwiGLU / GeGLU) ------------------------------------------------------------------


def test_gated_layer_parameters_follow_the_spec():
    layer = DAMoE(64, 96, num_experts=3, rank=5, gated=True)
    assert layer.adapt == ("gate", "fc1", "fc2")
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes["gate.weight"] == (96, 64) and shapes["gate.bias"] == (96,)
    assert shapes["gate_lora_A"] == (3, 5, 64) and shapes["gate_lora_B"] == (3, 96, 5)
    bound = 1 / math.sqrt(64)  # initialised like fc1's factors
    assert 0.9 * bound < layer.gate_lora_A.abs().max() <= bound
    assert not torch.allclose(layer.gate_lora_A[0], layer.gate_lora_A[1])
    assert (layer.gate_lora_B == 0).all()
    frozen = {n for n, p in layer.named_parameters() if not p.requires_grad}
    assert frozen == {"gate.weight", "gate.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert "gate_lora_A" not in dict(DAMoE(8, 16, gated=True, adapt=("fc1", "fc2")).named_parameters())
    assert DAMoE(8, 16).gate is None


def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=44, hidden_act="silu", num_attention_heads=2,
                                num_key_value_heads=2))


def test_gated_from_ffn_reproduces_llama_mlp():
    mlp = _llama_mlp()
    layer = DAMoE.from_ffn(mlp.up_proj, mlp.down_proj, "silu", gate=mlp.gate_proj, context_dim=3)
    assert layer.gate is mlp.gate_proj and layer.fc1 is mlp.up_proj and layer.fc2 is mlp.down_proj
    x = torch.randn(2, 7, 16)
    assert_close(layer(x, torch.randn(2, 3)), mlp(x), 1e-5, "LLaMA MLP at init")


@pytest.mark.parametrize("activation,torch_act", [("gelu", nn.GELU()), ("gelu_tanh", nn.GELU("tanh")),
                                                  ("quick_gelu", lambda z: z * torch.sigmoid(1.702 * z))])
def test_gated_from_ffn_reproduces_geglu(activation, torch_act):
    gate, up, down = nn.Linear(12, 30), nn.Linear(12, 30), nn.Linear(30, 12)
    layer = DAMoE.from_ffn(up, down, activation, gate=gate)
    x = torch.randn(9, 12)
    assert_close(layer(x), down(torch_act(gate(x)) * up(x)), 1e-5, f"{activation} GLU at init")


def test_gated_from_ffn_rejects_mismatched_gate():
    with pytest.raises(ValueError, match=r"gate must have fc1's shape \[d_ff, d_model\] = \[30, 12\], "
                                         r"got gate \[31, 12\]"):
        DAMoE.from_ffn(nn.Linear(12, 30), nn.Linear(30, 12), gate=nn.Linear(12, 31))
    with pytest.raises(ValueError, match="nn.Linear modules, got {'gate': 'Identity'}"):
        DAMoE.from_ffn(nn.Linear(12, 30), nn.Linear(30, 12), gate=nn.Identity())


@pytest.mark.parametrize("layout", ["batched-per-sample-context", "no-context"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_layer_torch_matches_reference(layout: str, activation: str):
    context_dim = 0 if layout == "no-context" else 6
    layer = perturbed(DAMoE(16, 40, num_experts=4, top_k=2, rank=4, alpha=8, context_dim=context_dim,
                            activation=activation, gated=True, backend="reference"))
    x = torch.randn(3, 5, 16)
    context = None if not context_dim else torch.randn(3, context_dim)
    assert "gate_lora_A" in dict(layer.named_parameters())
    assert_matches(twin(layer, "torch"), layer, x, context)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gated_layer_float64_gradcheck(backend: str):
    layer = perturbed(DAMoE(6, 10, num_experts=3, top_k=2, rank=2, context_dim=4, gated=True, activation="silu",
                            backend=backend, dtype=torch.float64))
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.gate_lora_A, layer.gate_lora_B, layer.fc1_lora_B, layer.fc2_lora_A, layer.router.token_proj.weight]

    def fn(x, context, *_):
        return layer(x, context)

    assert torch.autograd.gradcheck(fn, (x, context, *params))


@pytest.mark.parametrize(
    "kwargs,make_input",
    [
        (dict(), lambda: torch.randn(0, 16)),
        (dict(), lambda: torch.randn(1, 16)),
        (dict(num_experts=3, top_k=3), lambda: torch.randn(9, 16)),
        (dict(rank=1, bias=False), lambda: torch.randn(9, 16)),
        (dict(), lambda: torch.randn(16, 9).t()),
        (dict(adapt=("gate",)), lambda: torch.randn(9, 16)),
        (dict(dropout=0.3), lambda: torch.randn(9, 16)),
    ],
    ids=["0-tokens", "1-token", "k=E", "rank-1-no-bias", "non-contiguous", "gate-only", "dropout"],
)
def test_gated_configuration_edge_cases(kwargs, make_input):
    layer = perturbed(DAMoE(16, 24, gated=True, activation="silu", **kwargs))
    assert_matches(layer, twin(layer, "reference"), make_input())


def test_gated_all_tokens_to_one_expert_odd_sizes():
    layer = perturbed(DAMoE(13, 37, num_experts=3, gated=True, activation="silu"))
    with torch.no_grad():
        layer.router.token_proj.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    x = torch.randn(3, 7, 13)
    assert_matches(layer, twin(layer, "reference"), x)
    assert (layer.last_routing["indices"][:, 0] == 1).all()


def test_gated_full_experts_start_as_the_ffn_and_match_the_reference():
    mlp = _llama_mlp()
    layer = DAMoE.from_ffn(mlp.up_proj, mlp.down_proj, "silu", gate=mlp.gate_proj, expert_type="full", num_experts=3)
    assert layer.expert_gate_weight.shape == (3, 44, 16)
    x = torch.randn(2, 4, 16)
    assert_close(layer(x), mlp(x), 1e-5, "full gated experts at init")
    perturbed(layer)
    assert_matches(twin(layer, "torch"), twin(layer, "reference"), x)


def test_gated_layer_compiles_with_dynamic_shapes():
    layer = perturbed(DAMoE(16, 24, gated=True, activation="silu", backend="torch"))
    compiled = torch.compile(layer, dynamic=True, backend="aot_eager")  # inductor's C++ build is too slow for CI
    reference = twin(layer, "reference")
    for tokens in (5, 9):
        assert_matches(layer, reference, torch.randn(2, tokens, 16), call=compiled)

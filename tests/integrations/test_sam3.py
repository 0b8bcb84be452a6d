"""adapt_sam3 on transformers' Sam3Model (toy width, real architecture) and on Meta's sam3 fusion encoder."""

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="transformers (extra `sam3`) is not installed")
from transformers import Sam3Model  # noqa: E402

from dasam3 import load_adapter, save_adapter  # noqa: E402
from dasam3.integrations.sam3 import adapt_sam3  # noqa: E402
from dasam3.layers import ConceptContext, DAMoE, PatchedFFN, mark_trainable  # noqa: E402
from tests.toy_sam3 import toy_sam3_config  # noqa: E402

OUTPUTS = ("semantic_seg", "pred_masks", "pred_logits")


def _inputs(batch=2):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(batch, 3, 56, 56, generator=generator)
    ids = torch.randint(1, 62, (batch, 5), generator=generator)
    mask = torch.ones(batch, 5, dtype=torch.long)
    mask[-1, 3:] = 0  # one padded prompt, so the context's masked pooling matters
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask}


def _toy(detr_layers=6):
    return Sam3Model(toy_sam3_config(detr_layers))


def _randomise(model: nn.Module) -> None:
    """Move the experts and routers off their initial values (as training would)."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DAMoE):
                for name in ("fc1_lora_B", "fc2_lora_B"):
                    getattr(layer, name).normal_(std=0.5)
                layer.router.token_proj.weight.normal_(std=1.0)


def _assert_same_outputs(actual, expected):
    for key in OUTPUTS:
        a, e = getattr(actual, key), getattr(expected, key)
        scale = e.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, e / scale, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_unchanged_at_init(mode):
    model = _toy()
    oracle = copy.deepcopy(model)
    adapt_sam3(model)
    model.train(mode == "train")
    oracle.train(mode == "train")
    with torch.no_grad():
        _assert_same_outputs(model(**_inputs()), oracle(**_inputs()))


@pytest.mark.parametrize("num_layers", [6, 12])
def test_hierarchical_layer_choice(num_layers):
    model = adapt_sam3(_toy(num_layers), num_experts=4, top_k=2, rank=8)
    adapted = [i for i, layer in enumerate(model.detr_encoder.layers) if isinstance(layer.mlp, PatchedFFN)]
    one_based = sorted({math.ceil(num_layers / 6), math.ceil(num_layers / 4), math.ceil(num_layers / 2)})
    assert adapted == [i - 1 for i in one_based]  # 6 layers → 1, 2, 3 one-based
    for i in adapted:
        layer = model.detr_encoder.layers[i]
        assert isinstance(layer.concept_context, ConceptContext)
        assert (layer.mlp.num_experts, layer.mlp.top_k, layer.mlp.rank, layer.mlp.activation) == (4, 2, 8, "relu")
        assert layer.mlp.context_dim == 2 * 16  # d_model + text_dim


def test_trainable_set_is_the_fusion_encoder_scope():
    model = adapt_sam3(_toy())
    expected = set()
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        in_fusion = name.startswith("detr_encoder.")
        if in_fusion and (isinstance(module, nn.LayerNorm) or "LayerNorm" in type(module).__name__):
            expected |= {prefix + n for n, _ in module.named_parameters(recurse=False)}
        if isinstance(module, ConceptContext):
            expected |= {prefix + n for n, _ in module.named_parameters()}
        if isinstance(module, DAMoE):
            expected |= {prefix + n for n, _ in module.named_parameters() if "lora_" in n or n.startswith("router.")}
    count = mark_trainable(model, "warmup")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert any(".layer_norm" in n for n in trainable if n.startswith("detr_encoder.layers.5."))  # all 6 layers' norms
    for tower in ("vision_encoder", "text_encoder", "text_projection", "geometry_encoder", "detr_decoder",
                  "mask_decoder"):
        assert not any(p.requires_grad for p in getattr(model, tower).parameters()), tower
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    mark_trainable(model, "calibrate")
    calibrated = {n for n, p in model.named_parameters() if p.requires_grad}
    assert calibrated == {n for n in expected if ".router." in n or ".concept_context." in n}


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.to_tuple() if hasattr(output, "to_tuple") else output if isinstance(output, (tuple, list)) else ()
    return [t for item in items for t in _tensors(item)]


def _graph_leaves(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors the backward of `loss` accumulates into (a walk of its autograd graph)."""
    leaves, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _step_gradients(model) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(**_inputs()).semantic_seg.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_frozen_towers_run_without_autograd_and_gradients_are_unchanged():
    model = adapt_sam3(_toy())
    _randomise(model)
    mark_trainable(model, "warmup")
    unoptimised = copy.deepcopy(model).requires_grad_(True)  # autograd through every tower: the plain path
    seen = {}
    for tower in ("vision_encoder", "text_encoder"):
        module = getattr(model, tower)
        module.register_forward_hook(lambda m, a, out, t=tower: seen.update({t: _tensors(out)}))
        inner = next(iter(module.children()))  # grad mode as the tower's own layers see it
        inner.register_forward_hook(lambda m, a, out, t=tower: seen.update({f"{t} grad mode": torch.is_grad_enabled()}))
    model.train()
    loss = model(**_inputs()).semantic_seg.square().mean()
    assert torch.is_grad_enabled()  # restored after the towers ran
    assert seen["vision_encoder grad mode"] is False and seen["text_encoder grad mode"] is False
    assert seen["vision_encoder"] and all(t.grad_fn is None and not t.requires_grad
                                          for tower in ("vision_encoder", "text_encoder") for t in seen[tower])
    towers = {id(p) for tower in ("vision_encoder", "text_encoder") for p in getattr(model, tower).parameters()}
    leaves = _graph_leaves(loss)
    assert leaves and not leaves & towers
    expected = {n: g for n, g in _step_gradients(unoptimised).items()
                if model.get_parameter(n).requires_grad}
    actual = _step_gradients(model)
    assert set(actual) == set(expected) and len(actual) > 0
    for name, grad in expected.items():
        scale = grad.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(actual[name] / scale, grad / scale, rtol=0, atol=1e-5, msg=name)


def test_a_tower_that_trains_keeps_its_autograd():
    model = adapt_sam3(_toy())
    mark_trainable(model, "warmup")
    model.vision_encoder.backbone.layer_norm.requires_grad_(True)  # a user's choice, outside the paper's scope
    model.train()
    model(**_inputs()).semantic_seg.square().mean().backward()
    assert model.vision_encoder.backbone.layer_norm.weight.grad is not None


def test_gradients_reach_lora_factors_from_semantic_seg():
    model = adapt_sam3(_toy())
    mark_trainable(model, "warmup")
    model.train()
    model(**_inputs()).semantic_seg.square().mean().backward()
    layers = [m for m in model.modules() if isinstance(m, DAMoE)]
    # lora_A = 0 grad at init (its B is zero); lora_B gets the gradient that starts training
    assert all(layer.fc1_lora_B.grad.abs().sum() > 0 and layer.fc2_lora_B.grad.abs().sum() > 0 for layer in layers)
    _randomise(model)
    model.zero_grad()
    model(**_inputs()).semantic_seg.square().mean().backward()
    for layer in layers:
        for param in (layer.fc1_lora_A, layer.fc2_lora_A, layer.router.token_proj.weight,
                      layer.router.context_proj.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0
    contexts = [m for m in model.modules() if isinstance(m, ConceptContext)]
    assert all(c.query_proj.weight.grad.abs().sum() > 0 for c in contexts)


def test_router_context_comes_from_this_calls_prompt_and_tokens():
    model = adapt_sam3(_toy()).eval()
    layer = model.detr_encoder.layers[0]
    seen = {}
    layer.concept_context.register_forward_hook(lambda m, args, out: seen.update(concept=args[0], grid=args[1]))
    layer.register_forward_pre_hook(lambda m, args, kwargs: seen.update(tokens=args[0], prompt=kwargs["prompt_feats"]),
                                    with_kwargs=True)
    inputs = _inputs()
    with torch.no_grad():
        model(**inputs)
    valid = inputs["attention_mask"].bool()
    oracle = torch.stack([seen["prompt"][b][valid[b]].mean(0) for b in range(2)])  # mean over real tokens
    torch.testing.assert_close(seen["concept"], oracle)
    torch.testing.assert_close(seen["grid"], seen["tokens"].reshape(2, 4, 4, 16))  # the 4×4 DETR grid
    assert not layer.mlp.context_slot.is_set  # cleared when the layer returned
    with pytest.raises(RuntimeError, match="no router context"):
        layer.mlp(torch.randn(2, 16, 16))


def test_adapter_round_trip(tmp_path):
    base = _toy().eval()
    trained = adapt_sam3(copy.deepcopy(base), rank=4)
    _randomise(trained)
    with torch.no_grad():
        for module in trained.detr_encoder.modules():  # the fusion module's norms train, so the adapter holds them
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.1)
    path = save_adapter(trained, tmp_path / "adapter.safetensors")
    restored = adapt_sam3(copy.deepcopy(base), rank=4).eval()
    with torch.no_grad():
        expected = trained(**_inputs())
        assert (restored(**_inputs()).semantic_seg - expected.semantic_seg).abs().max() > 1e-3
        load_adapter(restored, path)
        _assert_same_outputs(restored(**_inputs()), expected)


def test_bad_calls():
    model = adapt_sam3(_toy())
    with pytest.raises(ValueError, match="already hold DA-MoE layers"):
        adapt_sam3(model)
    with pytest.raises(ValueError, match="router='random' ignores the concept context"):
        adapt_sam3(_toy(), router="random", use_context=True)
    with pytest.raises(TypeError, match="adapt_sam3 expects"):
        adapt_sam3(nn.Linear(2, 2))
    tokens_only = adapt_sam3(_toy(), router="random")  # the "w/o DER" ablation: no context at all
    assert not any(isinstance(m, ConceptContext) for m in tokens_only.modules())


# -- Meta's sam3 package ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def meta_sam3():
    encoder = pytest.importorskip("sam3.model.encoder", reason="Meta's `sam3` package is not installed")
    misc = pytest.importorskip("sam3.model.model_misc", reason="Meta's `sam3` package is not installed")
    return encoder, misc


def _meta_fusion(meta_sam3, d=16, num_layers=6):
    """Meta's fusion encoder as its model builder makes it (pre-norm, ReLU, checkpointed), at toy width."""
    encoder, misc = meta_sam3

    def attention():
        return misc.MultiheadAttentionWrapper(num_heads=2, dropout=0.0, embed_dim=d, batch_first=True)

    layer = encoder.TransformerEncoderLayer(
        activation="relu", d_model=d, dim_feedforward=2 * d, dropout=0.0, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=attention(), cross_attention=attention())
    return encoder.TransformerEncoderFusion(layer=layer, num_layers=num_layers, d_model=d, num_feature_levels=1,
                                            use_act_checkpoint=True, add_pooled_text_to_img_feat=False,
                                            pool_text_with_mask=True)


def _meta_call(fusion, d=16, height=4, width=3, batch=2, prompt_len=3):
    generator = torch.Generator().manual_seed(2)
    tokens = height * width
    padding = torch.zeros(batch, prompt_len, dtype=torch.bool)
    padding[-1, -1] = True
    return fusion(src=[torch.randn(tokens, batch, d, generator=generator)],
                  prompt=torch.randn(prompt_len, batch, d, generator=generator),
                  src_pos=[torch.randn(tokens, batch, d, generator=generator)], prompt_key_padding_mask=padding,
                  prompt_pos=torch.zeros(prompt_len, batch, d), feat_sizes=[(height, width)])["memory"]


@pytest.mark.parametrize("mode", ["eval", "train"])  # train: the encoder recomputes layers (checkpointing)
def test_meta_sam3_fusion_encoder(meta_sam3, mode):
    fusion = _meta_fusion(meta_sam3)
    oracle = copy.deepcopy(fusion)
    adapt_sam3(fusion)
    assert [i for i, layer in enumerate(fusion.layers) if isinstance(layer.linear1, PatchedFFN)] == [0, 1, 2]
    fusion.train(mode == "train")
    oracle.train(mode == "train")
    out = _meta_call(fusion)
    torch.testing.assert_close(out, _meta_call(oracle), rtol=0, atol=1e-5)
    _randomise(fusion)
    mark_trainable(fusion, "warmup")
    _meta_call(fusion).square().mean().backward()
    for layer in fusion.layers[:3]:
        moe = layer.linear1
        for param in (moe.fc1_lora_A, moe.fc2_lora_B, moe.router.context_proj.weight,
                      layer.concept_context.query_proj.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0

"""patch_ffn on every supported block type: function-preserving at init (the unpatched block is the
oracle), the experts really used afterwards (no fast path around them), activations, contexts, errors."""

import copy
import math

import pytest
import torch
from torch import nn

from dasam3.layers import ContextSlot, DAMoE, PatchedFFN, hierarchical_layers, patch_ffn
from dasam3.layers.patch import identify_activation

D, F = 16, 32


def _randomise_experts(model: nn.Module) -> None:
    """Make the lora_B factors non-zero so the experts differ from the frozen FFN."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, DAMoE):
                layer.fc1_lora_B.normal_(std=0.3)
                layer.fc2_lora_B.normal_(std=0.3)


def _assert_close(actual, expected):
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=1e-5)


def _torch_encoder(batch_first=True, activation="gelu"):
    layer = nn.TransformerEncoderLayer(D, 2, F, dropout=0.0, batch_first=batch_first, activation=activation)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)


class _Wrap(nn.Module):
    """A parent for FFN containers (patch_ffn replaces a container inside its parent)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def _timm_block():
    from timm.models.vision_transformer import Block

    return Block(D, num_heads=2, mlp_ratio=2.0)


def _sam_mlp():
    from segment_anything.modeling.common import MLPBlock

    return _Wrap(MLPBlock(D, F))


def _clip_layer():
    from transformers import CLIPTextConfig
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    # "gelu_new" is transformers' NewGELUActivation, the tanh approximation
    config = CLIPTextConfig(hidden_size=D, intermediate_size=F, num_attention_heads=2, hidden_act="gelu_new")
    return CLIPEncoderLayer(config)


BLOCKS = {
    "torch-encoder": (_torch_encoder, lambda m, x: m(x)),
    "torch-encoder-seq-first": (lambda: _torch_encoder(batch_first=False, activation="relu"), lambda m, x: m(x)),
    "torch-decoder": (lambda: nn.TransformerDecoderLayer(D, 2, F, dropout=0.0, batch_first=True, activation="gelu"),
                      lambda m, x: m(x, x.flip(1))),
    "timm-block": (_timm_block, lambda m, x: m(x)),
    "sam-mlpblock": (_sam_mlp, lambda m, x: m(x)),
    "hf-clip-layer": (_clip_layer, lambda m, x: m(x, None)),
}


@pytest.mark.parametrize("kind", BLOCKS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patch_preserves_function_at_init(kind, mode):
    build, call = BLOCKS[kind]
    model = build()
    oracle = copy.deepcopy(model)
    names = patch_ffn(model, num_experts=3, top_k=2, rank=4)
    assert names and all(isinstance(model.get_submodule(n), PatchedFFN) for n in names)
    model.train(mode == "train")
    oracle.train(mode == "train")
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        _assert_close(call(model, x), call(oracle, x))


@pytest.mark.parametrize("kind", BLOCKS)
def test_patched_experts_are_used_in_eval(kind):
    """With the experts moved off W0 the output must change, also where torch's fused fast path would run."""
    build, call = BLOCKS[kind]
    model = build()
    oracle = copy.deepcopy(model)
    patch_ffn(model, num_experts=3, top_k=2, rank=4)
    _randomise_experts(model)
    model.eval()
    oracle.eval()
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        fast = call(model, x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = call(model, x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        assert (fast - call(oracle, x)).abs().max() > 1e-2
    _assert_close(fast, slow)


@pytest.mark.parametrize("final_norm", [False, True])
@pytest.mark.parametrize("mode", ["eval-no-grad", "eval-grad", "train"])
def test_padded_positions_match_the_original_encoder(final_norm, mode):
    """The nested path (eval, no grad) gives padded positions zeros (then the final norm); elsewhere they are
    computed: a patched encoder, which cannot take that path, matches the original in every case."""
    layer = nn.TransformerEncoderLayer(D, 2, F, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D) if final_norm else None)
    with torch.no_grad():
        if final_norm:
            encoder.norm.bias.normal_()
    oracle = copy.deepcopy(encoder)
    patch_ffn(encoder)
    assert not encoder.use_nested_tensor
    for model in (encoder, oracle):
        model.train(mode == "train")
    x = torch.randn(3, 5, D)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = padding[2, -1:] = True
    with torch.set_grad_enabled(mode != "eval-no-grad"):
        expected = oracle(x, src_key_padding_mask=padding)
        _assert_close(encoder(x, src_key_padding_mask=padding), expected)
        _assert_close(encoder(x, None, padding), expected)  # positional arguments too
    if mode == "eval-no-grad":
        fill = encoder.norm(torch.zeros(D)) if final_norm else torch.zeros(D)
        assert torch.allclose(expected[0, -1], fill)  # what the original gives there


@pytest.mark.parametrize("kind", ["torch-encoder", "timm-block"])
def test_eval_model_gets_eval_layers(kind):
    """A model patched in eval mode gets layers in eval mode: no dropout at inference."""
    if kind == "torch-encoder":
        model = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, F, dropout=0.1, batch_first=True), 2,
                                      enable_nested_tensor=False)
    else:
        from timm.models.vision_transformer import Block

        model = Block(D, num_heads=2, mlp_ratio=2.0, proj_drop=0.1)
    model.eval()
    oracle = copy.deepcopy(model)
    names = patch_ffn(model)
    assert not any(model.get_submodule(n).training for n in names)
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        first, second = model(x), model(x)
        assert torch.equal(first, second)
        _assert_close(first, oracle(x))
    model.train()
    assert all(model.get_submodule(n).training for n in names)


def test_a_failure_part_way_changes_nothing():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, F, batch_first=True), 3,
                                    enable_nested_tensor=False)
    encoder.layers[2].activation = nn.Tanh()  # unsupported: the third block fails after two were planned
    state = copy.deepcopy(encoder.state_dict())
    flags = [p.requires_grad for p in encoder.parameters()]
    with pytest.raises(ValueError, match=r"cannot patch layers.2 \(TransformerEncoderLayer\): unsupported activation"):
        patch_ffn(encoder)
    assert all(isinstance(layer.linear1, nn.Linear) and isinstance(layer.linear2, nn.Linear)
               for layer in encoder.layers)
    assert [p.requires_grad for p in encoder.parameters()] == flags
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("kind", ["torch-encoder", "timm-block", "sam-mlpblock", "hf-clip-layer"])
def test_patching_twice_says_already_patched(kind):
    model = BLOCKS[kind][0]()
    names = patch_ffn(model)
    with pytest.raises(ValueError, match=r"already patched: \[.*\] hold DA-MoE layers"):
        patch_ffn(model)
    assert patch_ffn(model, []) == []  # an explicit empty choice is fine
    assert all(isinstance(model.get_submodule(n), PatchedFFN) for n in names)


def test_sam3_model_patches_with_its_quick_gelu_text_tower():
    from tests.toy_sam3 import toy_sam3_config
    from transformers import Sam3Model

    model = Sam3Model(toy_sam3_config(detr_layers=2)).eval()
    names = patch_ffn(model, num_experts=2, top_k=1, rank=2, backend="torch")
    activations = {model.get_submodule(n).activation for n in names}
    assert "quick_gelu" in activations and "relu" in activations
    assert any(n.startswith("detr_encoder.layers") for n in names)


@pytest.mark.parametrize("kind, expected", [("torch-encoder", "gelu"), ("torch-encoder-seq-first", "relu"),
                                            ("timm-block", "gelu"), ("hf-clip-layer", "gelu_tanh")])
def test_activation_is_kept(kind, expected):
    model = BLOCKS[kind][0]()
    names = patch_ffn(model)
    assert {model.get_submodule(n).activation for n in names} == {expected}


@pytest.mark.parametrize("fn, name", [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                      (torch.relu, "relu"), (nn.SiLU(), "silu"),
                                      (lambda z: z * torch.sigmoid(1.702 * z), "quick_gelu")])
def test_identify_activation(fn, name):
    assert identify_activation(fn) == name


@pytest.mark.parametrize("fn", [nn.Tanh(), nn.LeakyReLU(0.1), nn.PReLU()])
def test_unsupported_activation_is_refused(fn):
    layer = nn.TransformerEncoderLayer(D, 2, F, batch_first=True, activation=fn)
    with pytest.raises(ValueError, match="unsupported activation"):
        patch_ffn(layer)


def test_layer_choice():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, 2, F, batch_first=True), 6,
                                    enable_nested_tensor=False)
    expected = [f"layers.{math.ceil(6 / d) - 1}.linear1" for d in (6, 4, 2)]
    assert patch_ffn(copy.deepcopy(encoder), "hierarchical") == expected
    assert patch_ffn(copy.deepcopy(encoder), [4]) == ["layers.4.linear1"]
    assert patch_ffn(copy.deepcopy(encoder), ["layers.5"]) == ["layers.5.linear1"]
    with pytest.raises(ValueError, match="no supported FFN block named"):
        patch_ffn(copy.deepcopy(encoder), ["layers.9"])
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        patch_ffn(copy.deepcopy(encoder), [6])


@pytest.mark.parametrize("num_layers", [1, 2, 6, 12, 24])
def test_hierarchical_layers(num_layers):
    one_based = {math.ceil(num_layers / 6), math.ceil(num_layers / 4), math.ceil(num_layers / 2)}
    assert hierarchical_layers(num_layers) == sorted(i - 1 for i in one_based)


def test_context_slot_routes_and_guards():
    slot = ContextSlot(8)
    layers = {bf: nn.TransformerEncoderLayer(D, 2, F, dropout=0.0, batch_first=bf) for bf in (True, False)}
    for layer in layers.values():
        patch_ffn(layer, context=slot)
    _randomise_experts(layers[True])
    layers[False].load_state_dict(layers[True].state_dict())  # the same layer in both layouts
    x, context = torch.randn(3, 5, D), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="no router context"):
        layers[True](x)
    with slot.provide(context):
        batch_first = layers[True](x)
        seq_first = layers[False](x.transpose(0, 1)).transpose(0, 1)
        with pytest.raises(ValueError, match="batch size 2"):
            layers[True](x[:2])
    assert not slot.is_set
    _assert_close(seq_first, batch_first)
    with slot.provide(torch.randn(3, 8)):  # the routers do see the context
        assert (layers[True](x) - batch_first).abs().max() > 1e-4


def test_container_with_other_forward_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(D, F), nn.Linear(F, D), nn.GELU()

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))

    with pytest.raises(ValueError, match="its forward is not fc2"):
        patch_ffn(_Wrap(Residual()))


def test_bad_calls():
    from timm.layers import Mlp

    with pytest.raises(ValueError, match="takes \\['activation'\\]"):
        patch_ffn(_torch_encoder(), activation="relu")
    with pytest.raises(ValueError, match="no supported FFN block"):
        patch_ffn(nn.Linear(D, D))
    with pytest.raises(ValueError, match="pass the module that contains it"):
        patch_ffn(Mlp(D, F))
    with pytest.raises(ValueError, match="normalises its hidden layer"):
        patch_ffn(_Wrap(Mlp(D, F, norm_layer=nn.LayerNorm)))
    with pytest.raises(ValueError, match=r"context must be \[B, 8\]"):
        ContextSlot(8).set(torch.zeros(2, 4))

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


def test_nested_tensor_path_of_encoder_is_switched_off():
    encoder = _torch_encoder()
    oracle = copy.deepcopy(encoder).eval()
    patch_ffn(encoder)
    assert not encoder.use_nested_tensor
    encoder.eval()
    x = torch.randn(3, 5, D)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[:, -2:] = True
    with torch.no_grad():  # the nested path zeroes padded positions: compare the real tokens
        _assert_close(encoder(x, src_key_padding_mask=padding)[:, :-2], oracle(x, src_key_padding_mask=padding)[:, :-2])


@pytest.mark.parametrize("kind, expected", [("torch-encoder", "gelu"), ("torch-encoder-seq-first", "relu"),
                                            ("timm-block", "gelu"), ("hf-clip-layer", "gelu_tanh")])
def test_activation_is_kept(kind, expected):
    model = BLOCKS[kind][0]()
    names = patch_ffn(model)
    assert {model.get_submodule(n).activation for n in names} == {expected}


@pytest.mark.parametrize("fn, name", [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
                                      (torch.relu, "relu"), (nn.SiLU(), "silu")])
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

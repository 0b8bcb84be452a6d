"""patch_ffn on the FFN layouts of the models people use, each a tiny random-init model built from its
config: function-preserving at init (the unpatched copy is the oracle), trains, round-trips its adapter
exactly, and runs under torch.compile with dynamic shapes; inline layers are refused with the manual
route; the registry takes user layouts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dasam3
from dasam3.layers import DAMoE, PatchedFFN, mark_trainable, patch_ffn, register_ffn_layout, unregister_ffn_layout

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

PATCH = dict(num_experts=3, top_k=2, rank=4, backend="torch")
TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, vocab_size=64)


def _tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, 60, (batch, length), generator=torch.Generator().manual_seed(length))


def _image(size: int):
    return lambda batch, _: torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


def _hidden(model, x):
    return model(x).last_hidden_state


def _llama_like(name: str):
    config_cls = getattr(transformers, f"{name}Config")
    return lambda: getattr(transformers, f"{name}Model")(config_cls(**TINY_LM))


def _t5(feed_forward_proj: str):
    return lambda: transformers.T5EncoderModel(transformers.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, vocab_size=64, feed_forward_proj=feed_forward_proj))


def _timm_vit(mlp_layer: str, act_layer=nn.GELU):
    def build():
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                                 mlp_layer=getattr(timm.layers, mlp_layer), act_layer=act_layer)
    return build


def _phi3():
    return transformers.Phi3Model(transformers.Phi3Config(**TINY_LM, pad_token_id=0))


def _dinov2():
    return transformers.Dinov2Model(transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=2, image_size=28, patch_size=14,
                                                              use_swiglu_ffn=True))


def _bert():
    return transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=64))


def _hf_vit():
    return transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                        intermediate_size=64, image_size=32, patch_size=8))


def _gpt2():
    return transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                                          n_positions=32))


def _torchvision_vit():
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    model.heads = nn.Identity()  # its classifier starts at zero, which would hide every gradient
    return model


def _clip_text():
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
        hidden_act="quick_gelu", max_position_embeddings=16))


# name: (build, inputs(batch, length), output(model, inputs), activation, gated)
ARCHITECTURES = {
    "llama": (_llama_like("Llama"), _tokens, _hidden, "silu", True),
    "qwen2": (_llama_like("Qwen2"), _tokens, _hidden, "silu", True),
    "mistral": (_llama_like("Mistral"), _tokens, _hidden, "silu", True),
    "t5-relu-wi-wo": (_t5("relu"), _tokens, _hidden, "relu", False),
    "t5-gated-gelu": (_t5("gated-gelu"), _tokens, _hidden, "gelu_tanh", True),
    "dinov2-swiglu": (_dinov2, _image(28), _hidden, "silu", True),
    "timm-swiglu": (_timm_vit("SwiGLU", nn.SiLU), _image(32), lambda m, x: m.forward_features(x), "silu", True),
    "timm-glumlp": (_timm_vit("GluMlp"), _image(32), lambda m, x: m.forward_features(x), "gelu", True),
    "timm-swiglu-packed": (_timm_vit("SwiGLUPacked", nn.SiLU), _image(32), lambda m, x: m.forward_features(x),
                           "silu", True),
    "phi3": (_phi3, _tokens, _hidden, "silu", True),
    "bert": (_bert, _tokens, _hidden, "gelu", False),
    "hf-vit": (_hf_vit, _image(32), _hidden, "gelu", False),
    "gpt2-conv1d": (_gpt2, _tokens, _hidden, "gelu_tanh", False),
    "torchvision-vit": (_torchvision_vit, _image(32), lambda m, x: m(x), "gelu", False),
    "clip-quick-gelu": (_clip_text, _tokens, _hidden, "quick_gelu", False),
}


def _assert_within(actual: torch.Tensor, expected: torch.Tensor, relative: float, what: str) -> None:
    scale = expected.detach().abs().max().item()
    error = (actual.detach() - expected.detach()).abs().max().item()
    assert error <= relative * scale, f"{what}: max error {error:.3g} > {relative} x output scale {scale:.3g}"


def _patched(kind: str, seed: int = 0):
    build, inputs, output, _, _ = ARCHITECTURES[kind]
    torch.manual_seed(seed)
    model = build().eval()
    oracle = copy.deepcopy(model)
    names = patch_ffn(model, **PATCH)
    return model, oracle, names


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_patched_model_preserves_function_and_keeps_the_activation(kind):
    build, inputs, output, activation, gated = ARCHITECTURES[kind]
    model, oracle, names = _patched(kind)
    layers = [model.get_submodule(n) for n in names]
    assert len(layers) == 2 and all(isinstance(layer, PatchedFFN) for layer in layers)
    assert {(layer.activation, layer.gated) for layer in layers} == {(activation, gated)}
    assert not any(layer.training for layer in layers)  # the eval model's new layers are in eval mode
    x = inputs(2, 5)
    with torch.no_grad():
        _assert_within(output(model, x), output(oracle, x), 1e-5, f"{kind} at init")


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_patched_model_trains_round_trips_its_adapter_and_compiles(kind, tmp_path):
    build, inputs, output, _, _ = ARCHITECTURES[kind]
    model, _, names = _patched(kind)
    mark_trainable(model, "warmup")
    x = inputs(2, 5)
    with torch.no_grad():
        direction = torch.randn(output(model, x).shape, generator=torch.Generator().manual_seed(1))
    loss = lambda: (output(model, x) * direction).mean()  # noqa: E731 (eval mode: no dropout noise)
    before = loss()
    before.backward()
    for name in names:
        layer = model.get_submodule(name)
        assert all(layer.get_parameter(f"{p}_lora_B").grad.abs().max() > 0 for p in layer.adapt), name
    with torch.no_grad():
        for param in model.parameters():
            if param.grad is not None:
                param -= 0.05 * param.grad / param.grad.norm().clamp_min(1e-12)
    assert loss().item() < before.item(), "one step down the gradient lowers the loss"

    dasam3.save_adapter(model, tmp_path / "adapter.safetensors")
    fresh, _, _ = _patched(kind, seed=0)
    dasam3.load_adapter(fresh, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        assert torch.equal(output(fresh, x), output(model, x)), "the adapter round trip is exact"

    # dynamo's tracing with symbolic shapes is what can break; inductor's C++ build is too slow for CI
    compiled = torch.compile(model, dynamic=True, backend="eager")
    for batch, length in ((2, 5), (3, 7)):
        x = inputs(batch, length)
        with torch.no_grad():
            _assert_within(output(compiled, x), output(model, x), 1e-5, f"{kind} compiled, {batch}x{length}")


# -- refused layers: the message names the module and shows the manual route ----------------------


def _bart():
    return transformers.BartModel(transformers.BartConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                          encoder_attention_heads=2, decoder_attention_heads=2,
                                                          encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64))


def _opt():
    return transformers.OPTModel(transformers.OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        ffn_dim=64, vocab_size=64, word_embed_proj_dim=32))


def _mask2former_pixel_decoder_layer():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerPixelDecoderEncoderLayer

    config = transformers.Mask2FormerConfig(feature_size=32, encoder_feedforward_dim=64, num_attention_heads=2,
                                            backbone_config=transformers.SwinConfig(embed_dim=8, depths=[1, 1, 1, 1],
                                                                                     num_heads=[1, 1, 1, 1]))
    return nn.ModuleList([Mask2FormerPixelDecoderEncoderLayer(config)])


@pytest.mark.parametrize("build, module, activation", [
    (_bart, "encoder.layers.0 (BartEncoderLayer)", "gelu"),
    (_opt, "decoder.layers.0 (OPTDecoderLayer)", "relu"),
    (_mask2former_pixel_decoder_layer, "0 (Mask2FormerPixelDecoderEncoderLayer)", "relu"),
], ids=["bart", "opt", "mask2former-pixel-decoder"])
def test_inline_layers_are_refused_with_the_manual_route(build, module, activation):
    model = build()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as error:
        patch_ffn(model, **PATCH)
    message = str(error.value)
    assert f"cannot patch {module}" in message
    assert f"DAMoE.from_ffn(block.fc1, block.fc2, {activation!r}" in message and "register_ffn_layout" in message
    assert not any(isinstance(m, DAMoE) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_the_manual_route_for_an_inline_layer_preserves_function():
    """What the refusal message says to do, done on BART: exact in eval mode."""
    model = _bart().eval()
    oracle = copy.deepcopy(model)
    for block in (*model.encoder.layers, *model.decoder.layers):
        moe = DAMoE.from_ffn(block.fc1, block.fc2, "gelu", num_experts=4, backend="torch")
        block.fc1, block.fc2, block.activation_fn = moe, nn.Identity(), nn.Identity()
    ids = _tokens(2, 6)
    with torch.no_grad():
        _assert_within(_hidden(model, ids), _hidden(oracle, ids), 1e-5, "BART by hand")


# -- the registry ------------------------------------------------------------------------------------


class _OddFFN(nn.Module):
    """A block under names no built-in layout knows: down(nonlin(up(x)) * gate_in(x))."""

    def __init__(self):
        super().__init__()
        self.up, self.gate_in, self.down = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate_in(x)) * self.up(x))


def test_registered_layout_is_patched_and_unregistering_forgets_it():
    model = nn.Sequential(_OddFFN(), nn.LayerNorm(16)).eval()
    with pytest.raises(ValueError, match=r"no supported FFN block found in Sequential \(supported: .*LLaMA.*"
                                         r"register_ffn_layout"):
        patch_ffn(copy.deepcopy(model))
    layout = register_ffn_layout(_OddFFN, fc1="up", fc2="down", gate="gate_in", activation_name="silu")
    try:
        oracle = copy.deepcopy(model)
        assert patch_ffn(model, **PATCH) == ["0"]
        assert model[0].gated and torch.equal(model[0].gate.weight, oracle[0].gate_in.weight)
        x = torch.randn(3, 5, 16)
        with torch.no_grad():
            _assert_within(model(x), oracle(x), 1e-5, "registered layout")
    finally:
        unregister_ffn_layout(layout)
    with pytest.raises(ValueError, match="no supported FFN block"):
        patch_ffn(nn.Sequential(_OddFFN()))


def test_registered_layout_with_the_wrong_formula_is_refused():
    layout = register_ffn_layout(_OddFFN, fc1="gate_in", fc2="down", gate="up", activation_name="silu")
    try:
        with pytest.raises(ValueError, match=r"cannot patch 0 \(_OddFFN\): its forward is not "
                                             r"down\(silu\(up\(x\)\) ⊙ gate_in\(x\)\)"):
            patch_ffn(nn.Sequential(_OddFFN()))
    finally:
        unregister_ffn_layout(layout)


def test_register_ffn_layout_checks_its_arguments():
    with pytest.raises(ValueError, match="exactly one of activation .* and activation_name"):
        register_ffn_layout(_OddFFN, fc1="up", fc2="down")
    with pytest.raises(ValueError, match=r"activation_name must be one of .*got 'tanh'"):
        register_ffn_layout(_OddFFN, fc1="up", fc2="down", activation_name="tanh")
    with pytest.raises(ValueError, match="packed must be one of"):
        register_ffn_layout(_OddFFN, fc1="up", fc2="down", activation_name="silu", packed="interleaved")


def test_packed_weights_are_split_as_views():
    model, _, names = _patched("phi3")
    layer = model.get_submodule(names[0])
    assert layer.gate.weight.untyped_storage().data_ptr() == layer.fc1.weight.untyped_storage().data_ptr()
    assert layer.gate.weight.data_ptr() < layer.fc1.weight.data_ptr()  # gate first, as Phi-3 chunks it


def test_bert_output_block_keeps_its_residual_and_norm():
    model, _, names = _patched("bert")
    assert names == ["encoder.layer.0.intermediate", "encoder.layer.1.intermediate"]
    output = model.encoder.layer[0].output
    assert isinstance(output.dense, nn.Identity) and isinstance(output.LayerNorm, nn.LayerNorm)

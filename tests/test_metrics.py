"""dice / hd95 against medpy (the oracle), and the documented empty-mask rules."""

import math

import numpy as np
import pytest

from dasam3 import metrics

medpy_binary = pytest.importorskip("medpy.metric.binary")


def _random_pair(rng, ndim):
    shape = tuple(int(n) for n in rng.integers(3, 16, ndim))
    pred = rng.random(shape) < rng.uniform(0.05, 0.7)
    gt = rng.random(shape) < rng.uniform(0.05, 0.7)
    pred.flat[rng.integers(pred.size)] = True  # never empty
    gt.flat[rng.integers(gt.size)] = True
    return pred, gt


def _ellipsoid(shape, centre, radii):
    grid = np.indices(shape, dtype=np.float64)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_masks_match_medpy(ndim):
    rng = np.random.default_rng(ndim)
    for _ in range(60):
        pred, gt = _random_pair(rng, ndim)
        spacing = tuple(rng.uniform(0.3, 5.0, ndim))
        assert metrics.dice(pred, gt) == pytest.approx(medpy_binary.dc(pred, gt), abs=1e-6)
        assert metrics.hd95(pred, gt) == pytest.approx(medpy_binary.hd95(pred, gt), abs=1e-6)
        expected = medpy_binary.hd95(pred, gt, voxelspacing=spacing)
        assert metrics.hd95(pred, gt, spacing) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("spacing", [None, 1.7, (3.0, 0.7, 0.8)])
def test_organ_shaped_volumes_match_medpy(spacing):
    """Real-shaped masks: offset ellipsoids with a hole, one touching the array's edge, an extra
    island far away (so the percentile is not the whole story)."""
    shape = (40, 72, 64)
    gt = _ellipsoid(shape, (20, 36, 30), (12, 25, 18)) & ~_ellipsoid(shape, (20, 36, 30), (4, 6, 5))
    pred = _ellipsoid(shape, (22, 33, 34), (13, 24, 20))
    pred[0:3, 60:72, 50:64] = True  # island on the border
    for a, b in ((pred, gt), (gt, pred)):
        assert metrics.dice(a, b) == pytest.approx(medpy_binary.dc(a, b), abs=1e-6)
        expected = medpy_binary.hd95(a, b, voxelspacing=spacing)
        assert metrics.hd95(a, b, spacing) == pytest.approx(expected, abs=1e-6)


def test_single_voxels_and_connectivity_match_medpy():
    pred = np.zeros((9, 9, 9), bool)
    gt = np.zeros_like(pred)
    pred[1, 2, 3] = True
    gt[6, 7, 1] = True
    assert metrics.hd95(pred, gt, (2, 1, 0.5)) == pytest.approx(
        medpy_binary.hd95(pred, gt, voxelspacing=(2, 1, 0.5)), abs=1e-6)
    blob = _ellipsoid((20, 20, 20), (10, 10, 10), (6, 7, 5))
    shifted = np.roll(blob, 3, axis=1)
    for connectivity in (1, 2, 3):
        assert metrics.hd95(blob, shifted, connectivity=connectivity) == pytest.approx(
            medpy_binary.hd95(blob, shifted, connectivity=connectivity), abs=1e-6)


def test_identical_masks():
    mask = _ellipsoid((10, 12), (5, 6), (3, 4))
    assert metrics.dice(mask, mask) == 1.0
    assert metrics.hd95(mask, mask) == 0.0


def test_dice_empty_follows_medpy():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    with np.errstate(invalid="ignore"):
        assert math.isnan(medpy_binary.dc(empty, empty))
    assert math.isnan(metrics.dice(empty, empty))
    assert metrics.dice(full, empty) == medpy_binary.dc(full, empty) == 0.0


def test_hd95_refuses_empty_masks():
    empty = np.zeros((4, 4), bool)
    full = np.ones((4, 4), bool)
    with pytest.raises(ValueError, match="pred is empty"):
        metrics.hd95(empty, full)
    with pytest.raises(ValueError, match="gt is empty"):
        metrics.hd95(full, empty)


def test_bad_inputs_name_expected_and_received():
    with pytest.raises(ValueError, match=r"same shape.*\(3, 3\).*\(3, 4\)"):
        metrics.dice(np.ones((3, 3)), np.ones((3, 4)))
    with pytest.raises(ValueError, match=r"2-D or 3-D.*\(3,\)"):
        metrics.dice(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match=r"spacing.*\[1.0, 2.0\]"):
        metrics.hd95(np.ones((3, 3, 3)), np.ones((3, 3, 3)), spacing=(1.0, 2.0))


def test_transunet_rule_matches_calculate_metric_percase():
    """TransUNet/SAMed: both present → (dice, hd95); false positive on empty gt → (1, 0); missed → (0, 0)."""
    blob = _ellipsoid((12, 16, 16), (6, 8, 8), (4, 5, 5))
    moved = np.roll(blob, 2, axis=2)
    empty = np.zeros_like(blob)
    expected = (medpy_binary.dc(moved, blob), medpy_binary.hd95(moved, blob))
    assert metrics.calculate_metric_percase(moved, blob) == pytest.approx(expected, abs=1e-6)
    assert metrics.calculate_metric_percase(moved, empty) == (1.0, 0.0)
    assert metrics.calculate_metric_percase(empty, blob) == (0.0, 0.0)
    assert metrics.calculate_metric_percase(empty, empty) == (0.0, 0.0)


def test_strict_rule_penalises_a_missed_class_and_skips_an_absent_one():
    blob = _ellipsoid((12, 16, 16), (6, 8, 8), (4, 5, 5))
    empty = np.zeros_like(blob)
    spacing = (3.0, 1.0, 0.5)
    diagonal = math.sqrt((11 * 3.0) ** 2 + 15.0 ** 2 + 7.5 ** 2)
    assert metrics.score_pair(empty, blob, spacing) == pytest.approx((0.0, diagonal))
    assert metrics.score_pair(blob, empty, spacing) == pytest.approx((0.0, diagonal))
    both_empty = metrics.score_pair(empty, empty, spacing)
    assert math.isnan(both_empty[0]) and math.isnan(both_empty[1])
    with pytest.raises(ValueError, match="rule must be one of"):
        metrics.score_pair(blob, blob, rule="nnunet")


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (4.0, 1.0, 2.5)])
def test_real_anatomy_matches_medpy(spacing):
    """The MNI152 gray matter (thin, folded) against a slightly eroded, shifted copy."""
    from scipy.ndimage import binary_erosion

    pytest.importorskip("nilearn")
    from dasam3.data import mni152_volume

    gray = mni152_volume(2)[0].label[30:60] == 1
    moved = np.roll(binary_erosion(gray), 1, axis=1)
    assert metrics.dice(moved, gray) == pytest.approx(medpy_binary.dc(moved, gray), abs=1e-6)
    expected = medpy_binary.hd95(moved, gray, voxelspacing=spacing)
    assert metrics.hd95(moved, gray, spacing) == pytest.approx(expected, abs=1e-6)

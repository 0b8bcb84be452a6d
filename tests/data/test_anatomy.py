"""The anatomy check of label ids on a phantom abdomen: organs where they lie in every patient pass;
swapped ids fail the relation they break, with or without a stored orientation."""

import numpy as np
import pytest

from dasam3.data.anatomy import check_anatomy, report_text
from dasam3.data.btcv import BTCV_CLASSES

# Boxes in the slice layout [S (inferior → superior), H (anterior → posterior), W (patient right → left)]
# of a 24 × 40 × 48 volume, placed as in a real abdomen.
PHANTOM_BOXES = {
    "spleen": ((10, 17), (18, 28), (37, 45)),
    "right kidney": ((4, 12), (26, 34), (9, 16)),
    "left kidney": ((5, 13), (26, 34), (32, 39)),
    "gallbladder": ((9, 12), (5, 9), (13, 18)),
    "esophagus": ((18, 23), (22, 26), (25, 28)),
    "liver": ((8, 19), (6, 26), (2, 19)),
    "stomach": ((11, 17), (5, 15), (28, 36)),
    "aorta": ((0, 23), (27, 31), (24, 27)),
    "inferior vena cava": ((0, 18), (25, 29), (19, 22)),
    "portal and splenic veins": ((8, 11), (18, 21), (20, 30)),
    "pancreas": ((8, 10), (15, 18), (22, 36)),
    "right adrenal gland": ((14, 16), (23, 26), (12, 15)),
    "left adrenal gland": ((15, 17), (23, 26), (31, 34)),
}


def phantom(ids=None) -> np.ndarray:
    """The phantom with each organ stored under its BTCV id (or under `ids[name]`)."""
    label = np.zeros((24, 40, 48), np.int64)
    for name, box in PHANTOM_BOXES.items():
        value = (ids or {}).get(name, BTCV_CLASSES.index(name) + 1)
        label[tuple(slice(*b) for b in box)] = value
    return label


NAMES = dict(enumerate(BTCV_CLASSES, start=1))


def test_a_real_abdomen_passes_every_check():
    report = check_anatomy(phantom(), NAMES, spacing=(2.5, 0.8, 0.8), oriented=True)
    assert report.passed, report_text(report, "mm")
    relations = {c.relation for c in report.checks}
    assert {"the liver is the largest organ", "the left kidney lies opposite the liver",
            "the liver is on the patient's right", "the aorta lies between the kidneys",
            "the gallbladder is anterior to the right kidney"} <= relations
    assert len(report.checks) == 15  # size, 8 sides, right-sided liver, aorta, 4 oriented relations
    assert {report.side(o) for o in report.organs if o.name == "spleen"} == {"left"}


def test_swapped_kidney_ids_fail_the_side_checks():
    kidneys = {"right kidney": 3, "left kidney": 2}  # a fork's swap
    report = check_anatomy(phantom(kidneys), NAMES, oriented=True)
    failed = {c.relation for c in report.checks if not c.passed}
    assert failed == {"the right kidney lies on the liver's side", "the left kidney lies opposite the liver"}
    assert "FAIL: the right kidney lies on the liver's side" in report_text(report, "voxels")


@pytest.mark.parametrize("transform", ["flip", "transpose"])
def test_without_orientation_sides_are_relative_to_the_liver(transform):
    """TransUNet's h5 volumes store no orientation: a mirrored or transposed volume still passes, and a
    liver/spleen swap still fails."""
    label = phantom()
    label = label[:, :, ::-1] if transform == "flip" else label.transpose(0, 2, 1)
    report = check_anatomy(label, NAMES, oriented=False)
    assert report.passed and report.lateral_axis == (2 if transform == "flip" else 1)
    assert {c.relation for c in report.checks}.isdisjoint({"the liver is on the patient's right"})
    swapped = phantom({"liver": 1, "spleen": 6})
    failed = {c.relation for c in check_anatomy(swapped, NAMES).checks if not c.passed}
    assert "the liver is the largest organ" in failed and "the right kidney lies on the liver's side" in failed

"""MM-WHS CT: label values 205 … 850 → 1..7, the 16 / 4 split, unknown values rejected."""

import numpy as np
import pytest

from dasam3.data import DataError, MMWHSDataset, mmwhs_cases
from dasam3.data.mmwhs import MMWHS_CLASSES, MMWHS_TEST_CASES, MMWHS_TRAIN_CASES
from dasam3.io import SliceLayout
from tests.medical_files import oblique_affine, write_nifti

STORED = (0, 205, 420, 500, 550, 600, 820, 850)


def test_split_and_classes():
    assert MMWHS_TEST_CASES == ("1017", "1018", "1019", "1020")
    assert MMWHS_TRAIN_CASES == tuple(str(n) for n in range(1001, 1017))
    assert MMWHS_CLASSES == ("left ventricle myocardium", "left atrium", "left ventricle blood pool",
                             "right atrium", "right ventricle", "ascending aorta", "pulmonary artery")


def _write_split(folder, affine, rng):
    labels = {}
    for case_id in MMWHS_TEST_CASES:
        label = rng.choice(STORED, (5, 6, 4)).astype(np.int16)
        write_nifti(folder / f"ct_train_{case_id}_image.nii.gz",
                    rng.integers(-500, 800, (5, 6, 4)).astype(np.int16), affine)
        write_nifti(folder / f"ct_train_{case_id}_label.nii.gz", label, affine)
        labels[case_id] = label
    return labels


def test_label_values_map_to_classes(tmp_path):
    affine = oblique_affine(spacing=(0.4, 0.4, 0.6))
    labels = _write_split(tmp_path / "ct_train", affine, np.random.default_rng(0))
    dataset = MMWHSDataset(tmp_path, "test", image_size=8)
    volume = list(dataset.volumes())[2]
    expected = np.searchsorted(STORED, labels["1019"])  # 0 → 0, 205 → 1, …, 850 → 7
    np.testing.assert_array_equal(SliceLayout.from_affine(affine).from_slices(volume.label), expected)
    assert dataset.concepts == list(MMWHS_CLASSES) and volume.case_id == "1019"


def test_unknown_label_value_names_the_file(tmp_path):
    _write_split(tmp_path, np.eye(4), np.random.default_rng(1))  # files directly in root
    write_nifti(tmp_path / "ct_train_1018_label.nii.gz", np.full((5, 6, 4), 421, np.int16), np.eye(4))
    cases = mmwhs_cases(tmp_path, "test")
    with pytest.raises(DataError, match=r"ct_train_1018_label.nii.gz: unknown label values \[421\]"):
        cases[1].load()

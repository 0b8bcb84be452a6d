"""MM-WHS CT: label values 205 … 850 → 1..7 (421 read as LA with a warning), the named 16 / 4 splits,
the cardiac window that keeps contrast-filled blood apart from myocardium, unknown values rejected."""

import numpy as np
import pytest

from dasam3.data import DataError, DataWarning, MMWHSDataset, mmwhs_cases
from dasam3.data.mmwhs import MMWHS_CLASSES, MMWHS_SPLIT_SCHEMES, MMWHS_TEST_CASES, MMWHS_TRAIN_CASES
from dasam3.data.transforms import CARDIAC_CT_WINDOW, CT_WINDOW, normalize_ct
from dasam3.io import SliceLayout
from tests.medical_files import oblique_affine, write_nifti

STORED = (0, 205, 420, 500, 550, 600, 820, 850)


def test_named_splits_and_classes():
    assert MMWHS_SPLIT_SCHEMES["uda"]["test"] == ("1003", "1008", "1014", "1019") == MMWHS_TEST_CASES
    assert MMWHS_SPLIT_SCHEMES["last4"]["test"] == ("1017", "1018", "1019", "1020")
    for scheme in MMWHS_SPLIT_SCHEMES.values():
        assert len(scheme["train"]) == 16 and set(scheme["train"]).isdisjoint(scheme["test"])
        assert sorted(scheme["train"] + scheme["test"]) == [str(n) for n in range(1001, 1021)]
    assert MMWHS_TRAIN_CASES == MMWHS_SPLIT_SCHEMES["uda"]["train"]
    assert MMWHS_CLASSES == ("left ventricle myocardium", "left atrium", "left ventricle blood pool",
                             "right atrium", "right ventricle", "ascending aorta", "pulmonary artery")
    with pytest.raises(ValueError, match=r"split_scheme must be one of \['uda', 'last4'\], got 'random'"):
        mmwhs_cases(".", "test", split_scheme="random")


def _write_split(folder, affine, rng, cases=MMWHS_SPLIT_SCHEMES["last4"]["test"]):
    labels = {}
    for case_id in cases:
        label = rng.choice(STORED, (5, 6, 4)).astype(np.int16)
        write_nifti(folder / f"ct_train_{case_id}_image.nii.gz",
                    rng.integers(-500, 800, (5, 6, 4)).astype(np.int16), affine)
        write_nifti(folder / f"ct_train_{case_id}_label.nii.gz", label, affine)
        labels[case_id] = label
    return labels


def test_label_values_map_to_classes(tmp_path):
    affine = oblique_affine(spacing=(0.4, 0.4, 0.6))
    labels = _write_split(tmp_path / "ct_train", affine, np.random.default_rng(0))
    dataset = MMWHSDataset(tmp_path, "test", image_size=8, split_scheme="last4")
    volume = list(dataset.volumes())[2]
    expected = np.searchsorted(STORED, labels["1019"])  # 0 → 0, 205 → 1, …, 850 → 7
    np.testing.assert_array_equal(SliceLayout.from_affine(affine).from_slices(volume.label), expected)
    assert dataset.concepts == list(MMWHS_CLASSES) and volume.case_id == "1019"
    assert dataset.preprocessing.source == "split last4" and dataset.preprocessing.ct_window == (0.0, "p98")


def test_default_split_reads_the_common_test_cases(tmp_path):
    _write_split(tmp_path, np.eye(4), np.random.default_rng(2), MMWHS_TEST_CASES)
    assert MMWHSDataset(tmp_path, "test", image_size=8).case_ids == ["1003", "1008", "1014", "1019"]


def test_stray_421_is_the_left_atrium_with_a_warning(tmp_path):
    _write_split(tmp_path, np.eye(4), np.random.default_rng(1))  # files directly in root
    label = np.full((5, 6, 4), 420, np.int16)
    label[0, 0, :2] = 421
    write_nifti(tmp_path / "ct_train_1018_label.nii.gz", label, np.eye(4))
    case = mmwhs_cases(tmp_path, "test", split_scheme="last4")[1]
    with pytest.warns(DataWarning, match=r"ct_train_1018_label.nii.gz: label value 421 read as class 2"):
        volume = case.load()
    assert (volume.label == MMWHS_CLASSES.index("left atrium") + 1).all()


def test_unknown_label_value_names_the_file(tmp_path):
    _write_split(tmp_path, np.eye(4), np.random.default_rng(1))
    write_nifti(tmp_path / "ct_train_1018_label.nii.gz", np.full((5, 6, 4), 422, np.int16), np.eye(4))
    cases = mmwhs_cases(tmp_path, "test", split_scheme="last4")
    with pytest.raises(DataError, match=r"ct_train_1018_label.nii.gz: unknown label values \[422\]"):
        cases[1].load()


def test_cardiac_window_keeps_contrast_blood_apart_from_myocardium():
    """A cardiac CT angiogram: air, lung, fat, myocardium (~100 HU), contrast blood (350-500 HU), bone.
    The abdominal window saturates the blood pool; the cardiac one keeps it below bone and above muscle."""
    rng = np.random.default_rng(0)
    tissues = {"air": (-1000, 0.30), "lung": (-800, 0.25), "fat": (-100, 0.15), "myocardium": (100, 0.12),
               "blood": (420, 0.12), "bone": (1000, 0.06)}
    values = {name: rng.normal(hu, 40, int(share * 20000)) for name, (hu, share) in tissues.items()}
    volume = np.concatenate(list(values.values())).reshape(1, 1, -1)
    assert np.mean(normalize_ct(values["blood"], CT_WINDOW) == 1.0) > 0.99  # saturated, like bone
    pieces = np.split(normalize_ct(volume, CARDIAC_CT_WINDOW).ravel(),
                      np.cumsum([len(v) for v in values.values()])[:-1])
    normalized = dict(zip(values, pieces))
    high = np.percentile(volume, 98)  # the oracle: [0 HU, 98th percentile] → [0, 1]
    np.testing.assert_allclose(normalized["blood"], np.clip(values["blood"], 0, high) / high, rtol=1e-5)
    assert np.mean(normalized["blood"] >= 1.0) < 0.01
    assert np.median(normalized["blood"]) - np.median(normalized["myocardium"]) > 0.3

"""BTCV: 13 organs, the 24 / 6 split of MONAI's UNETR experiments, both file layouts."""

import numpy as np
import pytest

from dasam3.data import BTCVDataset, DataError, btcv_cases
from dasam3.data.btcv import BTCV_CASES, BTCV_CLASSES, BTCV_TEST_CASES, BTCV_TRAIN_CASES
from dasam3.io import SliceLayout
from tests.medical_files import oblique_affine, write_nifti


def test_split_and_classes():
    assert BTCV_CASES == tuple(f"{n:04d}" for n in [*range(1, 11), *range(21, 41)])
    assert BTCV_TEST_CASES == ("0035", "0036", "0037", "0038", "0039", "0040")
    assert len(BTCV_TRAIN_CASES) == 24 and set(BTCV_TRAIN_CASES).isdisjoint(BTCV_TEST_CASES)
    assert len(BTCV_CLASSES) == 13
    assert BTCV_CLASSES[8:10] == ("inferior vena cava", "portal and splenic veins")


def _write_case(image_dir, label_dir, case_id, affine, rng, shape=(6, 7, 5)):
    hu = rng.integers(-300, 400, shape).astype(np.int16)
    label = rng.integers(0, 14, shape).astype(np.uint8)
    write_nifti(image_dir / f"img{case_id}.nii.gz", hu, affine)
    write_nifti(label_dir / f"label{case_id}.nii.gz", label, affine)
    return hu, label


@pytest.mark.parametrize("layout_name", ["challenge", "monai"])
def test_reads_either_layout_with_all_13_labels(tmp_path, layout_name):
    image_dir, label_dir = ((tmp_path / "RawData/Training/img", tmp_path / "RawData/Training/label")
                            if layout_name == "challenge" else (tmp_path / "imagesTr", tmp_path / "labelsTr"))
    rng, affine = np.random.default_rng(0), oblique_affine()
    written = {c: _write_case(image_dir, label_dir, c, affine, rng) for c in BTCV_TEST_CASES}
    dataset = BTCVDataset(tmp_path, "test", image_size=16)
    assert dataset.case_ids == list(BTCV_TEST_CASES) and len(dataset.concepts) == 13
    volume = next(dataset.volumes())
    hu, label = written["0035"]
    layout = SliceLayout.from_affine(affine)
    np.testing.assert_array_equal(layout.from_slices(volume.label), label)
    # MONAI's BTCV recipe window, [-175, 250] HU → [0, 1]
    np.testing.assert_allclose(layout.from_slices(volume.image), (np.clip(hu, -175, 250) + 175) / 425,
                               atol=1e-6)
    assert (dataset.preprocessing.modality, dataset.preprocessing.ct_window) == ("ct", (-175.0, 250.0))
    item = dataset[0]
    assert item["image"].shape == (1, 16, 16) and item["masks"].shape == (13, 16, 16)


def test_bad_files_name_the_file(tmp_path):
    image_dir, label_dir = tmp_path / "imagesTr", tmp_path / "labelsTr"
    rng, affine = np.random.default_rng(1), np.eye(4)
    for case_id in BTCV_TEST_CASES:
        _write_case(image_dir, label_dir, case_id, affine, rng)
    write_nifti(label_dir / "label0036.nii.gz", np.zeros((6, 7, 4), np.uint8), affine)
    cases = btcv_cases(tmp_path, "test")
    with pytest.raises(DataError, match=r"label0036.nii.gz: label shape \(6, 7, 4\) does not match "
                                        r"the image .*img0036.nii.gz shape \(6, 7, 5\)"):
        cases[1].load()
    write_nifti(label_dir / "label0037.nii.gz", np.full((6, 7, 5), 14, np.uint8), affine)
    with pytest.raises(DataError, match=r"label0037.nii.gz: unknown label values \[14\]"):
        cases[2].load()
    (label_dir / "label0038.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="label0038.nii.gz"):
        btcv_cases(tmp_path, "test")
    (image_dir / "img0038.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="img0038.nii.gz"):
        btcv_cases(tmp_path, "test")

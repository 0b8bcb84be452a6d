"""ACDC: ED/ES frames from Info.cfg, the official 100 / 50 patients, short-axis (native) slices."""

import numpy as np
import pytest

from dasam3.data import ACDCDataset, DataError, acdc_cases
from dasam3.data.acdc import ACDC_CLASSES, ACDC_TEST_PATIENTS, ACDC_TRAIN_PATIENTS
from dasam3.data.transforms import normalize_mri
from tests.medical_files import write_nifti


def test_official_split():
    assert ACDC_TRAIN_PATIENTS[0] == "patient001" and ACDC_TRAIN_PATIENTS[-1] == "patient100"
    assert ACDC_TEST_PATIENTS[0] == "patient101" and ACDC_TEST_PATIENTS[-1] == "patient150"
    assert len(ACDC_TRAIN_PATIENTS) == 100 and len(ACDC_TEST_PATIENTS) == 50
    assert ACDC_CLASSES == ("right ventricle", "myocardium", "left ventricle")


def _write_patients(root, rng, shape=(9, 8, 3)):
    affine = np.diag([1.5, 1.5, 10.0, 1.0])
    written = {}
    for number in range(101, 151):
        patient = f"patient{number:03d}"
        folder = root / "testing" / patient
        folder.mkdir(parents=True)
        ed, es = 1, 5 + number % 7
        (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: 20\n")
        for phase, frame in (("ED", ed), ("ES", es)):
            image = rng.gamma(2.0, 50.0, shape).astype(np.float32)
            label = rng.integers(0, 4, shape).astype(np.uint8)
            write_nifti(folder / f"{patient}_frame{frame:02d}.nii.gz", image, affine)
            write_nifti(folder / f"{patient}_frame{frame:02d}_gt.nii.gz", label, affine)
            written[f"{patient}_{phase}"] = (image, label)
    return written


def test_ed_es_cases_in_native_slices(tmp_path):
    written = _write_patients(tmp_path, np.random.default_rng(0))
    dataset = ACDCDataset(tmp_path, "test", image_size=8)
    assert len(dataset.cases) == 100 and dataset.case_ids[:2] == ["patient101_ED", "patient101_ES"]
    assert len(dataset) == 100 * 3  # three short-axis slices per frame
    volume = dataset.cases[3].load()  # patient102_ES
    image, label = written["patient102_ES"]
    # native slices: [X, Y, Z] → [Z, Y flipped, X flipped] (as if the voxel axes were R, A, S)
    np.testing.assert_array_equal(volume.label, label.transpose(2, 1, 0)[:, ::-1, ::-1])
    np.testing.assert_allclose(volume.image, normalize_mri(image).transpose(2, 1, 0)[:, ::-1, ::-1])
    assert volume.spacing == pytest.approx((10.0, 1.5, 1.5))


def test_bad_info_and_missing_frames_name_the_file(tmp_path):
    _write_patients(tmp_path, np.random.default_rng(1))
    info = tmp_path / "testing/patient120/Info.cfg"
    info.write_text("Group: NOR\n")
    with pytest.raises(DataError, match=r"patient120/Info.cfg: no 'ED: <frame>' line"):
        acdc_cases(tmp_path, "test")
    info.write_text("ED: 1\nES: 4\n")
    with pytest.raises(FileNotFoundError, match="patient120_frame04.nii.gz"):
        acdc_cases(tmp_path, "test")
    info.unlink()
    with pytest.raises(FileNotFoundError, match="patient120/Info.cfg"):
        acdc_cases(tmp_path, "test")

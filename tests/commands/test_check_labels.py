"""`dasam3 check-labels` on label files in the reference formats: raw NIfTI with the challenge's ids
(any storage orientation) and TransUNet's h5 volumes with the 8 Synapse ids."""

import numpy as np
import pytest

from dasam3.cli import main
from dasam3.data.synapse import SYNAPSE_RAW_REMAP
from dasam3.io import SliceLayout
from tests.data.test_anatomy import phantom
from tests.medical_files import oblique_affine, write_nifti

h5py = pytest.importorskip("h5py")


def _nifti(path, label_in_layout, affine):
    """Store a slice-layout label map in the file's own voxel order."""
    return write_nifti(path, SliceLayout.from_affine(affine).from_slices(label_in_layout).astype(np.int16), affine)


def test_raw_nifti_of_either_dataset_passes_and_a_swap_fails(tmp_path, capsys):
    affine = oblique_affine(spacing=(0.8, 0.8, 2.5), angle=0.1)
    _nifti(tmp_path / "labels" / "label0001.nii.gz", phantom(), affine)
    assert main(["check-labels", str(tmp_path / "labels"), "--dataset", "btcv"]) == 0
    output = capsys.readouterr().out
    assert "FAIL" not in output and "PASS: the liver is on the patient's right" in output
    assert "| 6 | liver |" in output and "1 of 1 volumes pass every check" in output
    assert main(["check-labels", str(tmp_path / "labels" / "label0001.nii.gz")]) == 0  # synapse: 13 → 8
    assert "| 5 | liver |" in capsys.readouterr().out

    _nifti(tmp_path / "labels" / "label0002.nii.gz", phantom({"right kidney": 3, "left kidney": 2}), affine)
    assert main(["check-labels", str(tmp_path / "labels"), "--dataset", "btcv"]) == 1
    output = capsys.readouterr().out
    assert "FAIL: the right kidney lies on the liver's side" in output and "1 of 2 volumes pass" in output


def test_transunet_h5_volumes_without_orientation(tmp_path, capsys):
    eight = SYNAPSE_RAW_REMAP(phantom(), "phantom")  # SAMed's ids, as TransUNet's files store them
    stored = eight.transpose(0, 2, 1)[:, ::-1]  # an unknown in-plane orientation
    with h5py.File(tmp_path / "case0001.npy.h5", "w") as file:
        file["image"], file["label"] = np.zeros(stored.shape, np.float32), stored.astype(np.float32)
    assert main(["check-labels", str(tmp_path / "case0001.npy.h5")]) == 0
    output = capsys.readouterr().out
    assert "not stored: sides relative to the liver" in output and "| 7 | aorta |" in output
    swapped = np.where(stored == 1, 5, np.where(stored == 5, 1, stored))  # liver and spleen ids exchanged
    with h5py.File(tmp_path / "case0002.npy.h5", "w") as file:
        file["image"], file["label"] = np.zeros(stored.shape, np.float32), swapped.astype(np.float32)
    assert main(["check-labels", str(tmp_path / "case0002.npy.h5")]) == 1
    assert "FAIL: the liver is the largest organ (largest: spleen (id 1" in capsys.readouterr().out
    assert main(["check-labels", str(tmp_path / "case0001.npy.h5"), "--dataset", "btcv"]) == 1
    assert "h5 volumes hold TransUNet's Synapse ids" in capsys.readouterr().err

"""Synapse: TransUNet's npz slices and h5 volumes, the raw NIfTI with the 13 → 8 remap, the split."""

import numpy as np
import pytest

from dasam3.data import DataError, DataWarning, SynapseDataset, load_dataset, synapse_cases
from dasam3.data.btcv import BTCV_CASES
from dasam3.data.synapse import SYNAPSE_CLASSES, SYNAPSE_TEST_CASES, SYNAPSE_TRAIN_CASES
from dasam3.io import SliceLayout
from tests.medical_files import write_nifti

h5py = pytest.importorskip("h5py")

# raw label → Synapse class: spleen 1, right kidney 2, left kidney 3, gallbladder 4, liver 6 → 5,
# stomach 7 → 6, aorta 8 → 7, pancreas 11 → 8; esophagus, IVC, veins, adrenals → 0.
RAW_TO_SYNAPSE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0, 6: 5, 7: 6, 8: 7, 9: 0, 10: 0, 11: 8,
                  12: 0, 13: 0}


def test_official_split():
    assert SYNAPSE_TEST_CASES == ("0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029",
                                  "0032", "0035", "0036", "0038")
    assert len(SYNAPSE_TRAIN_CASES) == 18
    assert set(SYNAPSE_TRAIN_CASES).isdisjoint(SYNAPSE_TEST_CASES)
    assert set(SYNAPSE_TRAIN_CASES) | set(SYNAPSE_TEST_CASES) == set(BTCV_CASES)
    assert SYNAPSE_CLASSES == ("spleen", "right kidney", "left kidney", "gallbladder", "liver",
                               "stomach", "aorta", "pancreas")


def _write_npz_split(root, slices=2, size=12):
    rng = np.random.default_rng(0)
    expected = {}
    for case_id in SYNAPSE_TRAIN_CASES:
        for index in range(slices):
            image = rng.random((size, size)).astype(np.float32)
            label = rng.integers(0, 9, (size, size)).astype(np.uint8)
            (root / "train_npz").mkdir(parents=True, exist_ok=True)
            np.savez(root / "train_npz" / f"case{case_id}_slice{index:03d}.npz", image=image, label=label)
            expected[(case_id, index)] = (image, label)
    return expected


def _write_h5_split(root, depth=3, size=10):
    rng = np.random.default_rng(1)
    expected = {}
    (root / "test_vol_h5").mkdir(parents=True, exist_ok=True)
    for case_id in SYNAPSE_TEST_CASES:
        image = rng.random((depth, size, size)).astype(np.float32)
        label = rng.integers(0, 9, (depth, size, size)).astype(np.float32)
        with h5py.File(root / "test_vol_h5" / f"case{case_id}.npy.h5", "w") as file:
            file["image"], file["label"] = image, label
        expected[case_id] = (image, label)
    return expected


def test_npz_training_slices(tmp_path):
    expected = _write_npz_split(tmp_path)
    dataset = SynapseDataset(tmp_path, "train", image_size=12)
    assert len(dataset) == 2 * 18 and dataset.concepts == list(SYNAPSE_CLASSES)
    item = dataset[3]  # second case, slice 1 (cases in split order, slices by number)
    image, label = expected[(SYNAPSE_TRAIN_CASES[1], 1)]
    assert (item["case_id"], item["slice_index"]) == (SYNAPSE_TRAIN_CASES[1], 1)
    np.testing.assert_allclose(item["image"][0].numpy(), image)
    np.testing.assert_array_equal(item["label"].numpy(), label)
    for k in range(8):
        np.testing.assert_array_equal(item["masks"][k].numpy(), label == k + 1)


def test_h5_test_volumes(tmp_path):
    expected = _write_h5_split(tmp_path)
    dataset = load_dataset("synapse", tmp_path, "test", image_size=10)
    volumes = list(dataset.volumes())
    assert [v.case_id for v in volumes] == list(SYNAPSE_TEST_CASES)
    image, label = expected["0008"]
    np.testing.assert_allclose(volumes[4].image, image)
    np.testing.assert_array_equal(volumes[4].label, label.astype(np.int64))
    assert volumes[4].spacing == (1.0, 1.0, 1.0) and volumes[4].spacing_unit == "voxel"
    assert len(dataset) == 3 * 12
    assert (dataset.preprocessing.source, dataset.preprocessing.ct_window) == ("h5", (-125.0, 275.0))


def _reference_range_volume(rng, shape):
    """Values like TransUNet's distributed files: about [-0.15, 1.2], not [0, 1]."""
    image = rng.uniform(-0.15, 1.2, shape).astype(np.float32)
    image.flat[:2] = (-0.15, 1.2)
    return image


def test_transunet_reference_ranges_are_used_as_stored_with_a_warning(tmp_path):
    rng = np.random.default_rng(3)
    _write_npz_split(tmp_path)
    case = SYNAPSE_TRAIN_CASES[0]
    stored = [_reference_range_volume(rng, (12, 12)) for _ in range(2)]
    for index, image in enumerate(stored):
        np.savez(tmp_path / "train_npz" / f"case{case}_slice{index:03d}.npz", image=image,
                 label=np.zeros((12, 12), np.float32))
    with pytest.warns(DataWarning, match=rf"case{case}_slice\*.npz: intensities \[-0.15, 1.2\] lie outside "
                                          r"\[0, 1\].*used as stored, not clipped"):
        volume = SynapseDataset(tmp_path, "train").cases[0].load()
    np.testing.assert_array_equal(volume.image, np.stack(stored))  # not clipped

    _write_h5_split(tmp_path)
    image = _reference_range_volume(rng, (3, 10, 10))
    with h5py.File(tmp_path / "test_vol_h5" / "case0001.npy.h5", "w") as file:
        file["image"], file["label"] = image, np.zeros((3, 10, 10), np.float32)
    with pytest.warns(DataWarning, match=r"case0001.npy.h5: intensities \[-0.15, 1.2\]"):
        volume = next(SynapseDataset(tmp_path, "test").volumes())
    np.testing.assert_array_equal(volume.image, image)


def test_preprocessed_files_holding_raw_hu_are_windowed_with_a_warning(tmp_path):
    _write_h5_split(tmp_path)
    hu = np.random.default_rng(4).integers(-1024, 1500, (3, 10, 10)).astype(np.float32)
    with h5py.File(tmp_path / "test_vol_h5" / "case0002.npy.h5", "w") as file:
        file["image"], file["label"] = hu, np.zeros((3, 10, 10), np.float32)
    with pytest.warns(DataWarning, match=r"case0002.npy.h5: intensities .* exceed 2: read as raw HU and windowed "
                                         r"to \(-125.0, 275.0\)"):
        volume = SynapseDataset(tmp_path, "test").cases[1].load()
    np.testing.assert_allclose(volume.image, (np.clip(hu, -125, 275) + 125) / 400, atol=1e-6)


def test_raw_nifti_remap_window_and_orientation(tmp_path):
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])  # BTCV's radiological storage
    rng = np.random.default_rng(2)
    raw = {}
    for case_id in SYNAPSE_TEST_CASES:
        hu = rng.integers(-1000, 1000, (8, 6, 4)).astype(np.int16)
        label = rng.integers(0, 14, (8, 6, 4)).astype(np.uint8)
        write_nifti(tmp_path / "RawData/Training/img" / f"img{case_id}.nii.gz", hu, affine)
        write_nifti(tmp_path / "RawData/Training/label" / f"label{case_id}.nii.gz", label, affine)
        raw[case_id] = (hu, label)
    cases = synapse_cases(tmp_path, "test")  # no test_vol_h5 → raw
    volume = cases[0].load()
    hu, label = raw[cases[0].case_id]
    layout = SliceLayout.from_affine(affine)
    expected_image = (np.clip(hu, -125, 275) + 125) / 400.0
    np.testing.assert_allclose(layout.from_slices(volume.image), expected_image, atol=1e-6)
    remapped = np.vectorize(RAW_TO_SYNAPSE.get)(label)
    np.testing.assert_array_equal(layout.from_slices(volume.label), remapped)
    assert volume.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert volume.image.shape == (4, 6, 8)


def test_preprocessed_bad_data_names_the_file(tmp_path):
    _write_npz_split(tmp_path)
    bad = tmp_path / "train_npz" / f"case{SYNAPSE_TRAIN_CASES[0]}_slice000.npz"
    np.savez(bad, image=np.zeros((12, 12)), label=np.full((12, 12), 12))
    with pytest.raises(DataError, match=rf"{bad.name}: unknown label values \[12\]"):
        SynapseDataset(tmp_path)[0]
    np.savez(bad, image=np.full((12, 12), -5.0), label=np.zeros((12, 12)))
    with pytest.raises(DataError, match=r"case0005_slice\*.npz: intensities \[-5, [0-9.]+\] are neither scaled CT"):
        SynapseDataset(tmp_path)[0]
    np.savez(bad, image=np.zeros((12, 12)), label=np.zeros((12, 10)))
    with pytest.raises(DataError, match=rf"{bad.name}: expected a 2-D image and label of one shape"):
        SynapseDataset(tmp_path)[0]
    np.savez(bad, picture=np.zeros((12, 12)))
    with pytest.raises(DataError, match=rf"{bad.name}: npz file lacks the arrays \['image', 'label'\]"):
        SynapseDataset(tmp_path)[0]
    bad.write_bytes(b"PK not really a zip")
    with pytest.raises(DataError, match=rf"{bad.name}: cannot read as npz"):
        SynapseDataset(tmp_path)[0]
    (tmp_path / "train_npz" / f"case{SYNAPSE_TRAIN_CASES[5]}_slice001.npz").unlink()
    (tmp_path / "train_npz" / f"case{SYNAPSE_TRAIN_CASES[5]}_slice000.npz").unlink()
    with pytest.raises(FileNotFoundError, match=f"case{SYNAPSE_TRAIN_CASES[5]}_sliceNNN.npz"):
        SynapseDataset(tmp_path)


def test_h5_bad_data_names_the_file(tmp_path):
    _write_h5_split(tmp_path)
    bad = tmp_path / "test_vol_h5" / "case0022.npy.h5"
    with h5py.File(bad, "w") as file:
        file["image"], file["label"] = np.zeros((3, 10, 10)), np.zeros((3, 10, 9))
    with pytest.raises(DataError, match=r"case0022.npy.h5: image shape \(3, 10, 10\) does not match"):
        list(SynapseDataset(tmp_path, "test").volumes())
    with h5py.File(bad, "w") as file:
        file["image"] = np.zeros((3, 10, 10))
    with pytest.raises(DataError, match="case0022.npy.h5: HDF5 file lacks the dataset 'label'"):
        list(SynapseDataset(tmp_path, "test").volumes())
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError, match="case0022.npy.h5: cannot read as HDF5"):
        SynapseDataset(tmp_path, "test")
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="case0022.npy.h5"):
        SynapseDataset(tmp_path, "test")


def test_unknown_split_and_source():
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\], got 'val'"):
        synapse_cases(".", "val")
    with pytest.raises(ValueError, match="source must be one of.*'dicom'"):
        synapse_cases(".", "train", source="dicom")

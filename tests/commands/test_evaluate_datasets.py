"""`dasam3 evaluate --dataset`: ground truth in the datasets' own files and ids, scored in the model's
label space (medpy on the remapped masks is the oracle), with the dataset's protocol."""

import json

import numpy as np
import pytest

from dasam3.cli import main
from tests.medical_files import oblique_affine, write_nifti

medpy_binary = pytest.importorskip("medpy.metric.binary")

# raw BTCV id → the 8-class (SAMed) id: spleen 1, kidneys 2/3, gallbladder 4, liver 6 → 5, stomach 7 → 6,
# aorta 8 → 7, pancreas 11 → 8; the other organs → background.
RAW_TO_SYNAPSE = np.array([0, 1, 2, 3, 4, 0, 5, 6, 7, 0, 0, 8, 0, 0])


def _blobs(shape, values, rng):
    """A label volume with one box per value (random positions), background 0."""
    label = np.zeros(shape, np.int16)
    for value in values:
        corner = [rng.integers(0, n - 4) for n in shape]
        label[tuple(slice(c, c + 4) for c in corner)] = value
    return label


def _perturb(label, rng):
    pred = label.copy()
    pred[rng.random(label.shape) < 0.1] = 0
    return pred


def _evaluate(root, *extra):
    return main(["evaluate", "--pred", str(root / "pred"), "--gt", str(root / "gt"), "--out", str(root / "out"),
                 *extra])


def test_raw_synapse_ground_truth_is_remapped_and_scored_like_transunet(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for case in ("0001", "0002"):
        raw = _blobs((12, 14, 10), range(1, 14), rng)
        pred = _perturb(RAW_TO_SYNAPSE[raw], rng)
        write_nifti(tmp_path / "gt" / f"label{case}.nii.gz", raw, oblique_affine())
        write_nifti(tmp_path / "pred" / f"img{case}.nii.gz", pred.astype(np.uint8), oblique_affine())
        expected[case] = (pred, RAW_TO_SYNAPSE[raw])
    assert _evaluate(tmp_path, "--dataset", "synapse") == 0
    document = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert document["protocol"] == "transunet" and document["hd95_unit"] == "voxel"
    assert document["classes"]["5"] == "liver" and len(document["classes"]) == 8
    for row in document["cases"]:
        pred, gt = expected[row["case_id"]]
        p, g = pred == row["label"], gt == row["label"]
        assert row["dice"] == pytest.approx(medpy_binary.dc(p, g), abs=1e-6)
        assert row["hd95"] == pytest.approx(medpy_binary.hd95(p, g), abs=1e-6)
    header = (tmp_path / "out" / "evaluation.md").read_text().splitlines()[0]
    assert header.split(" | ")[3].startswith("aorta") and "(voxels)" in header


def test_mmwhs_ids_and_the_stray_421_score_in_the_model_space(tmp_path, capsys):
    rng = np.random.default_rng(1)
    stored = _blobs((12, 12, 12), (205, 420, 500, 550, 600, 820, 850), rng)
    stored[stored == 420] = np.where(rng.random(int((stored == 420).sum())) < 0.2, 421, 420)
    model = np.searchsorted((0, 205, 420, 500, 550, 600, 820, 850), np.where(stored == 421, 420, stored))
    write_nifti(tmp_path / "gt" / "ct_train_1003_label.nii.gz", stored, np.eye(4))
    write_nifti(tmp_path / "pred" / "ct_train_1003_image.nii.gz", model.astype(np.uint8), np.eye(4))
    with pytest.warns(UserWarning, match="label value 421 read as class 2"):
        assert _evaluate(tmp_path, "--dataset", "mmwhs") == 0
    document = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert document["protocol"] == "mm" and document["mean"] == {"dice": 1.0, "hd95": 0.0}
    assert document["cases"][0]["case_id"] == "1003" and document["classes"]["2"] == "left atrium"


def test_acdc_layout_pairs_nested_ground_truth_and_names_what_is_missing(tmp_path, capsys):
    rng = np.random.default_rng(2)
    for patient, frame in (("patient101", 1), ("patient102", 14)):
        stem = f"{patient}_frame{frame:02d}"
        gt = _blobs((10, 10, 6), (1, 2, 3), rng)
        write_nifti(tmp_path / "gt" / patient / f"{stem}_gt.nii.gz", gt.astype(np.uint8), np.eye(4))
        write_nifti(tmp_path / "gt" / patient / f"{stem}.nii.gz", rng.random((10, 10, 6)), np.eye(4))  # the image
        write_nifti(tmp_path / "pred" / f"{stem}.nii.gz", gt.astype(np.uint8), np.eye(4))
    assert _evaluate(tmp_path, "--dataset", "acdc", "--protocol", "transunet") == 0
    document = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert sorted({r["case_id"] for r in document["cases"]}) == ["patient101_frame01", "patient102_frame14"]
    assert list(document["classes"].values()) == ["right ventricle", "myocardium", "left ventricle"]
    assert document["mean"]["dice"] == 1.0 and document["protocol"] == "transunet"
    (tmp_path / "pred" / "patient102_frame14.nii.gz").unlink()
    assert _evaluate(tmp_path, "--dataset", "acdc", "--overwrite") == 1
    assert "patient102_frame14_gt.nii.gz (expected patient102_frame14.nii.gz or " in capsys.readouterr().err

"""`dasam3 evaluate`: per-case, per-class scores equal to medpy's, protocols, names, errors."""

import json

import numpy as np
import pytest

from dasam3.cli import main
from tests.medical_files import oblique_affine, write_nifti

medpy_binary = pytest.importorskip("medpy.metric.binary")

SPACING = (0.8, 1.5, 3.0)


def _pair(rng, shape=(14, 16, 12)):
    gt = np.zeros(shape, np.uint8)
    gt[3:10, 4:12, 2:9] = 1
    gt[2:6, 1:4, 8:11] = 2
    pred = gt.copy()
    pred[rng.random(shape) < 0.05] = 0
    pred[5:12, 6:14, 3:10][gt[5:12, 6:14, 3:10] == 0] = 1
    return pred, gt


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    affine = oblique_affine(spacing=SPACING)
    pairs = {}
    for case in ("case1", "case2"):
        pred, gt = _pair(rng)
        write_nifti(tmp_path / "gt" / f"{case}.nii.gz", gt, affine)
        write_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred, affine)
        pairs[case] = (pred, gt)
    return tmp_path, pairs


def _evaluate(root, *extra):
    return main(["evaluate", "--pred", str(root / "pred"), "--gt", str(root / "gt"), *extra])


def test_scores_equal_medpy_in_mm(folders, capsys):
    root, pairs = folders
    assert _evaluate(root) == 0
    document = json.loads((root / "pred" / "evaluation.json").read_text())
    assert document["classes"] == {"1": "label 1", "2": "label 2"}
    for row in document["cases"]:
        pred, gt = pairs[row["case_id"]]
        expected_hd95 = medpy_binary.hd95(pred == row["label"], gt == row["label"], voxelspacing=SPACING)
        assert row["dice"] == pytest.approx(medpy_binary.dc(pred == row["label"], gt == row["label"]),
                                            abs=1e-6)
        assert row["hd95"] == pytest.approx(expected_hd95, abs=1e-6)
    output = capsys.readouterr().out
    assert output.startswith("| Method | DSC ↑ | HD95 ↓ (mm) | label 1 (DSC / HD95) | label 2 (DSC / HD95) |")
    assert (root / "pred" / "evaluation_cases.csv").read_text().count("\n") == 1 + 4
    assert _evaluate(root) == 1  # results exist: not replaced without --overwrite
    assert _evaluate(root, "--overwrite") == 0


def test_transunet_protocol_labels_and_legend_names(folders):
    root, pairs = folders
    (root / "pred" / "case1.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver",
                                                                      "2": "spleen", "3": "kidney"}}))
    out = root / "results"
    assert _evaluate(root, "--protocol", "transunet", "--labels", "2,3", "--out", str(out)) == 0
    document = json.loads((out / "evaluation.json").read_text())
    assert document["classes"] == {"2": "spleen", "3": "kidney"} and document["hd95_unit"] == "voxel"
    rows = {(r["case_id"], r["label"]): r for r in document["cases"]}
    pred, gt = pairs["case2"]
    assert rows[("case2", 2)]["hd95"] == pytest.approx(medpy_binary.hd95(pred == 2, gt == 2), abs=1e-6)
    assert (rows[("case2", 3)]["dice"], rows[("case2", 3)]["hd95"]) == (0.0, 0.0)  # TransUNet rule


def test_spacing_from_none_gives_voxels(folders):
    root, pairs = folders
    assert _evaluate(root, "--spacing-from", "none", "--labels", "1") == 0
    row = json.loads((root / "pred" / "evaluation.json").read_text())["cases"][0]
    pred, gt = pairs["case1"]
    assert row["hd95"] == pytest.approx(medpy_binary.hd95(pred == 1, gt == 1), abs=1e-6)


def test_errors_name_the_files(folders, capsys):
    root, _ = folders
    write_nifti(root / "pred" / "case2.nii.gz", np.zeros((14, 16, 11), np.uint8))
    assert _evaluate(root) == 1
    error = capsys.readouterr().err
    assert "pred/case2.nii.gz: shape (14, 16, 11) differs from the ground truth" in error
    assert "gt/case2.nii.gz" in error
    (root / "pred" / "case2.nii.gz").unlink()
    assert _evaluate(root) == 1
    assert "predictions missing for the ground truth: " in capsys.readouterr().err
    write_nifti(root / "pred" / "case2.nii.gz", np.full((14, 16, 12), 0.5, np.float32))
    assert _evaluate(root) == 1
    assert "case2.nii.gz: a label map must hold integers" in capsys.readouterr().err
    assert _evaluate(root, "--labels", "one") == 1
    assert "--labels must be comma-separated integers, got 'one'" in capsys.readouterr().err
    assert not (root / "pred" / "evaluation.json").exists()

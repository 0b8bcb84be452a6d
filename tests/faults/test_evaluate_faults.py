"""`dasam3 evaluate` refuses to score label maps whose label spaces or geometry disagree (one error line
naming the files, nothing written), scores them with `--allow-mismatch` and a warning, and never treats a
negative value as a class."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.faults.tools import assert_one_line_error, run_main, snapshot, unwritable_folder
from tests.medical_files import write_nifti

AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
LEGEND = {"labels": {"0": "background", "1": "liver", "2": "spleen"}}


def _maps():
    gt = np.zeros((8, 9, 6), np.int16)
    gt[1:5, 2:6, 1:4] = 1
    gt[5:7, 5:8, 2:5] = 2
    return gt.copy(), gt


@pytest.fixture
def folders(tmp_path):
    for case in ("case1", "case2"):
        pred, gt = _maps()
        write_nifti(tmp_path / "gt" / f"{case}.nii.gz", gt, AFFINE)
        write_nifti(tmp_path / "pred" / f"{case}.nii.gz", pred, AFFINE)
        (tmp_path / "pred" / f"{case}.json").write_text(json.dumps(LEGEND))
    return tmp_path


def _evaluate(capsys, root, *extra):
    return run_main(capsys, "evaluate", "--pred", root / "pred", "--gt", root / "gt", "--out", root / "out", *extra)


def _label_outside_legend(root):
    pred, _ = _maps()
    pred[0, 0, 0] = 3
    write_nifti(root / "pred" / "case2.nii.gz", pred, AFFINE)
    return "case2.nii.gz", "[3]"


def _gt_outside_legend(root):
    _, gt = _maps()
    gt[0, 0, 0] = 7
    write_nifti(root / "gt" / "case1.nii.gz", gt, AFFINE)
    return "gt/case1.nii.gz", "[7]"


def _conflicting_legends(root):
    (root / "pred" / "case2.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen",
                                                                      "2": "liver"}}))
    return "case1.json", "case2.json"


def _shifted_affine(root):
    pred, _ = _maps()
    shifted = AFFINE.copy()
    shifted[0, 3] = 100.0  # 100 mm away
    write_nifti(root / "pred" / "case1.nii.gz", pred, shifted)
    return "pred/case1.nii.gz", "different affines"


def _hallucinated_class_without_legends(root):
    for legend in (root / "pred").glob("*.json"):
        legend.unlink()
    return _label_outside_legend(root)


MISMATCHES = {
    "prediction label outside the legend": _label_outside_legend,
    "ground truth label outside the legend": _gt_outside_legend,
    "legends that disagree": _conflicting_legends,
    "a 100 mm affine shift": _shifted_affine,
    "prediction label absent from every ground truth": _hallucinated_class_without_legends,
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_disagreements_are_refused_unless_allowed(folders, capsys, case):
    names = MISMATCHES[case](folders)
    before = snapshot(folders)
    assert_one_line_error(_evaluate(capsys, folders), "evaluate", *names, "--allow-mismatch")
    assert snapshot(folders) == before and not (folders / "out").exists()
    allowed = _evaluate(capsys, folders, "--allow-mismatch")
    assert allowed.rc == 0 and "Traceback" not in allowed.err
    assert any(line.startswith("dasam3 evaluate: warning: ") and names[0] in line for line in allowed.err.splitlines())
    assert (folders / "out" / "evaluation.json").is_file()


def test_a_negative_label_is_never_a_class(folders, capsys):
    _, gt = _maps()
    gt[0, 0, 0] = -1
    write_nifti(folders / "gt" / "case1.nii.gz", gt, AFFINE)
    for extra in ((), ("--allow-mismatch",)):
        assert_one_line_error(_evaluate(capsys, folders, *extra), "evaluate", "gt/case1.nii.gz", "-1")
    assert not (folders / "out").exists()


def test_corrupt_and_mislabelled_label_maps_are_named(folders, capsys):
    (folders / "pred" / "case1.nii.gz").write_bytes(b"")
    assert_one_line_error(_evaluate(capsys, folders), "evaluate", "pred/case1.nii.gz")
    pred, _ = _maps()
    write_nifti(folders / "pred" / "case1.nii.gz", pred.astype(np.float32) + 0.5, AFFINE)  # probabilities
    assert_one_line_error(_evaluate(capsys, folders), "evaluate", "pred/case1.nii.gz", "integers")
    (folders / "pred" / "case2.json").write_text("{not json")
    write_nifti(folders / "pred" / "case1.nii.gz", pred, AFFINE)
    assert _evaluate(capsys, folders).rc == 0  # a file that is not a legend is not one: the other names the labels


def test_results_never_replace_earlier_ones_and_need_a_writable_folder(folders, capsys):
    assert _evaluate(capsys, folders).rc == 0
    before = snapshot(folders / "out")
    assert_one_line_error(_evaluate(capsys, folders), "evaluate", "evaluation.json", "--overwrite")
    assert snapshot(folders / "out") == before
    with unwritable_folder(folders) as folder:
        result = run_main(capsys, "evaluate", "--pred", folders / "pred", "--gt", folders / "gt", "--out", folder)
        assert_one_line_error(result, "evaluate", str(folder))

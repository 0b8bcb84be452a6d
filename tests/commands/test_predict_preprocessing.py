"""`dasam3 predict` uses how the checkpoint was trained (its preprocessing.json): modality, CT window
and plane; flags override it with a warning; older checkpoints without a record use the flags."""

import json

import numpy as np
import pytest
import torch

from dasam3.data import Preprocessing
from dasam3.data.transforms import normalize_ct, normalize_mri
from tests.commands.test_predict import StandInModel, _run, model  # noqa: F401 (the stand-in fixture)
from tests.medical_files import write_nifti

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])  # identity: axial slices are file axis 2, rows -y, columns -x


def _to_axial(data):
    return data.transpose(2, 1, 0)[:, ::-1, ::-1]


def _ct_scan(tmp_path):
    hu = np.random.default_rng(0).integers(-1000, 1000, (10, 10, 6)).astype(np.float32)
    return write_nifti(tmp_path / "scan.nii.gz", hu, AFFINE), hu


def _record(tmp_path, **values):
    settings = {"dataset": "mmwhs", "modality": "ct", "ct_window": (0.0, "p98"), "plane": "axial",
                "image_size": 10, **values}
    Preprocessing(**settings).save(tmp_path / "ckpt")


def test_a_ct_checkpoint_is_windowed_as_trained_without_flags(tmp_path, model, capsys):
    source, hu = _ct_scan(tmp_path)
    _record(tmp_path)
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz")) == 0
    expected = _to_axial(normalize_ct(hu, (0.0, "p98")))  # [0 HU, 98th percentile], not MRI percentiles
    np.testing.assert_allclose(torch.cat(model.inputs)[:, 0].numpy(), expected, atol=1e-5)
    assert "warning" not in capsys.readouterr().err
    legend = json.loads((tmp_path / "o.json").read_text())
    assert (legend["modality"], legend["plane"], legend["ct_window"]) == ("ct", "axial", [0.0, "p98"])


def test_a_native_plane_checkpoint_slices_along_the_files_third_axis(tmp_path, model):
    data = np.random.default_rng(1).gamma(2.0, 100.0, (10, 10, 4)).astype(np.float32)
    oblique = np.array([[0.0, 0.0, 8.0, 0.0], [1.2, 0.0, 0.0, 0.0], [0.0, 1.2, 0.0, 0.0], [0, 0, 0, 1]])
    source = write_nifti(tmp_path / "sax.nii.gz", data, oblique)  # file axis 2 is not the axial one
    _record(tmp_path, dataset="acdc", modality="mri", ct_window=None, plane="native")
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz")) == 0
    images = torch.cat(model.inputs)[:, 0]
    assert images.shape[0] == 4  # one slice per short-axis plane
    np.testing.assert_allclose(images.numpy(), _to_axial(normalize_mri(data)), atol=1e-5)


def test_flags_override_the_training_with_a_warning(tmp_path, model, capsys):
    source, hu = _ct_scan(tmp_path)
    _record(tmp_path)
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz"), "--ct-window", "-125", "275") == 0
    np.testing.assert_allclose(torch.cat(model.inputs)[:, 0].numpy(), _to_axial(normalize_ct(hu)), atol=1e-5)
    error = capsys.readouterr().err
    assert "warning: --ct-window -125 275 differs from the training's 0 p98" in error
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "m.nii.gz"), "--modality", "mri") == 0
    assert "--modality mri differs from the training's ct" in capsys.readouterr().err
    assert json.loads((tmp_path / "m.json").read_text())["modality"] == "mri"


def test_an_older_checkpoint_without_a_record_uses_the_flags(tmp_path, model, capsys):
    source, hu = _ct_scan(tmp_path)
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz")) == 0
    np.testing.assert_allclose(torch.cat(model.inputs)[:, 0].numpy(), _to_axial(normalize_mri(hu)), atol=1e-5)
    assert "records no preprocessing (an older checkpoint): using --modality mri --plane axial" in \
        capsys.readouterr().err
    model.inputs.clear()
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "c.nii.gz"), "--modality", "ct") == 0
    np.testing.assert_allclose(torch.cat(model.inputs)[:, 0].numpy(), _to_axial(normalize_ct(hu)), atol=1e-5)


def test_a_bad_window_bound_is_refused(tmp_path, model, capsys):
    source, _ = _ct_scan(tmp_path)
    with pytest.raises(SystemExit):
        _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz"), "--ct-window", "0", "p200")
    assert "a window bound is a number or pNN (a percentile), got 'p200'" in capsys.readouterr().err

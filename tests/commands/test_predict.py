"""`dasam3 predict` end to end with a stand-in model: geometry kept, labels where the model put them,
normalisation, legends, no overwriting, bad inputs."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dasam3.cli import main
from dasam3.commands import predict as predict_command
from tests.medical_files import nib, oblique_affine, world_coordinates, write_nifti


class StandInModel:
    """Exactly the DASAM3 interface predict relies on. Labels: 1 where channel 0 is bright; 2 at the
    top-left pixel (row 0, column 0) of every slice; 3 at the bottom-right pixel of the batch's last
    slice (the most superior one when one batch holds the whole volume)."""

    def __init__(self, image_size=10, in_channels=3, concepts=("bright", "corner", "top")):
        self.config = SimpleNamespace(image_size=image_size, in_channels=in_channels,
                                      concepts=list(concepts))
        self.inputs, self.concepts = [], []

    def predict_labels(self, images, concepts):
        assert images.shape[1:] == (self.config.in_channels, self.config.image_size,
                                    self.config.image_size)
        self.inputs.append(images.clone())
        self.concepts.append(list(concepts))
        labels = (images[:, 0] > 0.5).long()
        labels[:, 0, 0] = 2
        labels[-1, -1, -1] = 3
        return labels


@pytest.fixture
def model(monkeypatch, tmp_path):
    stand_in = StandInModel()
    loads = []

    def load_model(checkpoint, device):
        loads.append((checkpoint, device))
        return stand_in

    monkeypatch.setattr(predict_command, "load_model", load_model)
    (tmp_path / "ckpt").mkdir()
    stand_in.loads = loads
    return stand_in


def _ct_volume(tmp_path, name="ct.nii.gz", shape=(6, 10, 10)):
    """int16 HU with scaling, oblique anisotropic affine; a bright block in file coordinates."""
    stored = np.full(shape, -50, np.int16)  # stored * 2 - 100 = -200 HU
    stored[1:4, 2:5, 3:7] = 175  # stored * 2 - 100 = 250 HU
    affine = oblique_affine(spacing=(0.8, 1.5, 3.0))
    return write_nifti(tmp_path / name, stored, affine, slope_inter=(2.0, -100.0)), stored == 175


def _run(tmp_path, *extra):
    return main(["predict", "--checkpoint", str(tmp_path / "ckpt"), *extra])


def test_geometry_is_kept_and_labels_land_where_the_model_put_them(tmp_path, model):
    source, bright = _ct_volume(tmp_path)
    output = tmp_path / "out" / "labels.nii.gz"
    assert _run(tmp_path, "-i", str(source), "-o", str(output), "--modality", "ct") == 0

    reference, written = nib.load(str(source)), nib.load(str(output))
    assert written.shape == reference.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, reference.affine)
    for field in ("qform_code", "sform_code", "descrip", "pixdim"):
        np.testing.assert_array_equal(written.header[field], reference.header[field])
    assert written.dataobj.slope == 1.0 and written.dataobj.inter == 0.0

    labels = np.asarray(written.dataobj)
    np.testing.assert_array_equal(labels == 1, bright & (labels != 2) & (labels != 3))
    x, y, z = world_coordinates(labels.shape, written.affine)
    # slices are file axis 0 here (closest to S); label 2 is the anterior-right corner of each
    for index in range(labels.shape[0]):
        corner = labels[index] == 2
        assert corner.sum() == 1
        assert y[index][corner] > y[index].mean() and x[index][corner] > x[index].mean()
    top = labels == 3  # the last slice of the batch: the most superior, posterior-left corner
    assert top.sum() == 1
    top_slice = np.flatnonzero(top.any(axis=(1, 2)))[0]
    assert z[top_slice].mean() == z.mean(axis=(1, 2)).max()
    assert y[top].item() < y[top_slice].mean() and x[top].item() < x[top_slice].mean()

    legend = json.loads((tmp_path / "out" / "labels.json").read_text())
    assert legend["labels"] == {"0": "background", "1": "bright", "2": "corner", "3": "top"}
    assert model.loads == [(tmp_path / "ckpt", torch.device("cpu"))]


def test_ct_window_and_channels_reach_the_model(tmp_path, model):
    source, _ = _ct_volume(tmp_path)
    _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz"), "--modality", "ct",
         "--concept", "liver", "--concept", "spleen", "--concept", "kidney", "--batch-size", "4")
    images = torch.cat(model.inputs)
    assert images.shape == (6, 3, 10, 10)
    # -200 HU → clipped to -125 → 0, 250 HU → 375 / 400; the three channels are the same slice
    assert set(images.unique().tolist()) == {0.0, 375 / 400}
    assert torch.equal(images[:, 0], images[:, 2])
    assert model.concepts == [["liver", "spleen", "kidney"]] * 2


def test_mri_percentile_scaling_reaches_the_model(tmp_path, model):
    data = np.random.default_rng(0).gamma(2.0, 100.0, (10, 10, 6)).astype(np.float32)
    source = write_nifti(tmp_path / "t1.nii.gz", data, np.diag([1.0, 1.0, 1.0, 1.0]))
    _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz"))  # mri is the default
    low, high = np.percentile(data, (0.5, 99.5))
    expected = np.clip((data - low) / (high - low), 0, 1)
    # identity affine: slices along file axis 2, rows = -y, columns = -x
    expected = expected.transpose(2, 1, 0)[:, ::-1, ::-1]
    np.testing.assert_allclose(torch.cat(model.inputs)[:, 0].numpy(), expected, atol=1e-5)


def test_resizes_to_the_model_and_back(tmp_path, model):
    model.config.image_size = 8
    source = write_nifti(tmp_path / "small.nii.gz", np.ones((12, 9, 5), np.float32), np.eye(4))
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz")) == 0
    labels = np.asarray(nib.load(str(tmp_path / "o.nii.gz")).dataobj)
    assert labels.shape == (12, 9, 5)
    assert set(np.unique(labels)) <= {0, 1, 2, 3} and (labels == 2).sum() >= 5


def test_folder_in_folder_out_with_default_concepts(tmp_path, model):
    inputs = tmp_path / "scans"
    _ct_volume(inputs, "a.nii.gz")
    _ct_volume(inputs, "b.nii")
    (inputs / "notes.txt").write_text("not an image")
    assert _run(tmp_path, "-i", str(inputs), "-o", str(tmp_path / "preds")) == 0
    assert sorted(p.name for p in (tmp_path / "preds").iterdir()) == ["a.json", "a.nii.gz", "b.json",
                                                                       "b.nii"]
    assert model.concepts[0] == ["bright", "corner", "top"]


def test_never_overwrites_and_checks_before_loading_the_model(tmp_path, model, capsys):
    source, _ = _ct_volume(tmp_path)
    output = tmp_path / "o.nii.gz"
    output.write_bytes(b"precious")
    assert _run(tmp_path, "-i", str(source), "-o", str(output)) == 1
    error = capsys.readouterr().err
    assert "o.nii.gz" in error and "--overwrite" in error
    assert output.read_bytes() == b"precious" and model.loads == []
    (tmp_path / "o.json").write_text("{}")
    output.unlink()
    assert _run(tmp_path, "-i", str(source), "-o", str(output)) == 1
    assert not output.exists() and model.loads == []
    assert _run(tmp_path, "-i", str(source), "-o", str(output), "--overwrite") == 0
    assert nib.load(str(output)).shape == (6, 10, 10)
    assert _run(tmp_path, "-i", str(source), "-o", str(source), "--overwrite") == 1


def test_bad_inputs_name_the_file_and_write_nothing(tmp_path, model, capsys):
    inputs = tmp_path / "scans"
    (inputs / "broken.nii.gz").parent.mkdir()
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    assert _run(tmp_path, "-i", str(inputs), "-o", str(tmp_path / "preds")) == 1
    assert "broken.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "preds").exists() and model.loads == []  # nothing readable: the model is not loaded

    cine = write_nifti(tmp_path / "cine.nii.gz", np.zeros((4, 4, 3, 2), np.float32))
    assert _run(tmp_path, "-i", str(cine), "-o", str(tmp_path / "c.nii.gz")) == 1
    assert "cine.nii.gz: expected a 3-D volume, got shape (4, 4, 3, 2)" in capsys.readouterr().err
    assert _run(tmp_path, "-i", str(tmp_path / "absent.nii.gz"), "-o", str(tmp_path / "x.nii.gz")) == 1
    assert "input not found" in capsys.readouterr().err
    assert _run(tmp_path, "-i", str(cine), "-o", str(tmp_path / "x.png")) == 1
    assert "output must end in .nii or .nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "c.nii.gz").exists() and model.loads == []


def test_duplicate_concepts_are_refused(tmp_path, model, capsys):
    source, _ = _ct_volume(tmp_path)
    assert _run(tmp_path, "-i", str(source), "-o", str(tmp_path / "o.nii.gz"), "--concept", "liver",
                "--concept", "liver") == 1
    assert "repeated: ['liver']" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()

"""`dasam3 predict` against bad inputs, bad model files and bad destinations: one error line naming the
file, no traceback, nothing earlier changed; a folder run segments every readable file."""

from __future__ import annotations

import gzip
import json
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dasam3.models import DASAM3, DASAM3Config
from tests.faults.tools import assert_one_line_error, run_main, snapshot, unwritable_folder
from tests.medical_files import nib, write_nifti

CONCEPTS = ["disc", "square"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny real DASAM3 checkpoint (random weights: it labels some of every finite input, and a NaN
    input gives NaN probabilities, so all background)."""
    torch.manual_seed(0)
    config = DASAM3Config(image_size=16, concepts=CONCEPTS, image_encoder_options={"widths": [4, 8, 8]},
                          text_encoder_options={"dim": 8}, d_model=8, num_layers=2, num_heads=2, d_ff=16, mask_dim=4)
    model = DASAM3(config)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    model.save_pretrained(folder)
    return folder


def _volume(folder, name="scan.nii.gz", shape=(6, 12, 10)):
    data = np.random.default_rng(0).gamma(2.0, 100.0, shape).astype(np.float32)
    return write_nifti(folder / name, data), data


def _predict(capsys, checkpoint, source, output, *extra):
    return run_main(capsys, "predict", "-i", source, "-o", output, "--checkpoint", checkpoint, "--device", "cpu",
                    *extra)


def test_nan_and_inf_voxels_are_left_out_of_the_normalisation_and_reported(checkpoint, tmp_path, capsys):
    clean, data = _volume(tmp_path / "clean")
    assert _predict(capsys, checkpoint, clean, tmp_path / "clean.nii.gz").rc == 0
    data[2, 3, 4], data[0, 0, 0] = np.nan, np.inf
    dirty = write_nifti(tmp_path / "dirty" / "scan.nii.gz", data)
    result = _predict(capsys, checkpoint, dirty, tmp_path / "dirty.nii.gz")
    assert result.rc == 0 and "Traceback" not in result.err
    assert f"{dirty}: 2 of {data.size} voxels are NaN or infinite" in result.err
    expected = np.asarray(nib.load(str(tmp_path / "clean.nii.gz")).dataobj)
    labels = np.asarray(nib.load(str(tmp_path / "dirty.nii.gz")).dataobj)
    assert (expected > 0).any() and (labels > 0).any()  # not the all-background map a NaN percentile gave
    assert (labels != expected).mean() < 0.05  # two voxels fewer in the percentiles change little
    assert json.loads((tmp_path / "dirty.json").read_text())["non_finite_voxels"] == 2


def _nan_weights(folder):
    weights = load_file(str(folder / "model.safetensors"))
    next(v for k, v in weights.items() if "decoder" in k and v.is_floating_point()).view(-1)[0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))


def _truncate(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _forge_header(folder):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 16]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))


def _edit_config(**changes):
    def edit(folder):
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


MODEL_FAULTS = {
    "nan weights": (_nan_weights, "model.safetensors", "NaN or inf"),
    "truncated weights": (_truncate, "model.safetensors", "not a readable safetensors"),
    "forged header": (_forge_header, "model.safetensors", "not a readable safetensors"),
    "empty weights": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors", "safetensors"),
    "invalid json": (lambda f: (f / "config.json").write_text("{not json"), "config.json", "not valid JSON"),
    "float d_ff": (_edit_config(d_ff=1e9), "config.json", "d_ff must be an integer"),
    "absurd d_ff": (_edit_config(d_ff=10**9), "model.safetensors", "the config makes it [1000000000"),
    "unknown field": (_edit_config(width=3), "config.json", "width"),
}


@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
def test_damaged_model_files_are_named(checkpoint, tmp_path, capsys, fault):
    damage, name, words = MODEL_FAULTS[fault]
    folder = tmp_path / "model"
    folder.mkdir()
    for part in checkpoint.iterdir():
        (folder / part.name).write_bytes(part.read_bytes())
    damage(folder)
    source, _ = _volume(tmp_path / "in")
    result = _predict(capsys, folder, source, tmp_path / "out" / "scan.nii.gz")
    assert_one_line_error(result, "predict", str(folder / name), words)
    assert not (tmp_path / "out").exists()


def test_unwritable_destinations_stop_the_run_before_the_model_loads(checkpoint, tmp_path, capsys, monkeypatch):
    from dasam3.commands import predict

    loads = []
    monkeypatch.setattr(predict, "load_model", lambda *args: loads.append(args))
    source, _ = _volume(tmp_path / "in")
    with unwritable_folder(tmp_path) as folder:
        result = _predict(capsys, checkpoint, source, folder / "scan.nii.gz")
        assert_one_line_error(result, "predict", str(folder))
        result = _predict(capsys, checkpoint, tmp_path / "in", folder / "preds")
        assert_one_line_error(result, "predict", str(folder))
    (tmp_path / "file").write_text("not a folder")
    result = _predict(capsys, checkpoint, source, tmp_path / "file" / "scan.nii.gz")
    assert_one_line_error(result, "predict", "file", "not a folder")
    assert loads == []


def _truncated_body(path):
    """A .nii.gz whose header reads but whose voxels are cut off."""
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))


def test_a_folder_run_segments_every_readable_file_and_names_every_bad_one(checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    _volume(inputs, "a.nii.gz")
    _volume(inputs, "d.nii.gz")
    _truncated_body(_volume(inputs, "b_body.nii.gz")[0])
    (inputs / "c_empty.nii").write_bytes(b"")
    (inputs / "c_text.nii.gz").write_text("a text file named like an image")
    write_nifti(inputs / "c_4d.nii.gz", np.zeros((4, 4, 3, 2), np.float32))
    result = _predict(capsys, checkpoint, inputs, tmp_path / "out")
    assert result.rc == 1 and "Traceback" not in result.err
    errors = [line for line in result.err.splitlines() if line.startswith("dasam3 predict: error: ")]
    bad = ["b_body.nii.gz", "c_empty.nii", "c_text.nii.gz", "c_4d.nii.gz"]
    assert sorted(next(b for b in bad if b in line) for line in errors) == sorted(bad)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.json", "a.nii.gz", "d.json", "d.nii.gz"]
    # the bad files fixed, a rerun segments just them, leaving the earlier outputs as they were
    for name in bad:
        (inputs / name).unlink()
    _volume(inputs, "b_body.nii.gz")
    before = snapshot(tmp_path / "out")
    result = _predict(capsys, checkpoint, inputs, tmp_path / "out", "--skip-existing")
    assert result.rc == 0 and "Traceback" not in result.err
    assert {k: v for k, v in snapshot(tmp_path / "out").items() if k in before} == before
    assert (tmp_path / "out" / "b_body.nii.gz").is_file()


def test_legends_never_collide(checkpoint, tmp_path, capsys):
    inputs = tmp_path / "in"
    _volume(inputs, "case.nii")
    _volume(inputs, "case.nii.gz")
    result = _predict(capsys, checkpoint, inputs, tmp_path / "out")
    assert_one_line_error(result, "predict", "case.nii", "case.nii.gz", "case.json")
    assert not (tmp_path / "out").exists()
    # one at a time into one folder: the second would replace the first's legend, so it is refused
    assert _predict(capsys, checkpoint, inputs / "case.nii", tmp_path / "out" / "case.nii").rc == 0
    before = snapshot(tmp_path / "out")
    result = _predict(capsys, checkpoint, inputs / "case.nii.gz", tmp_path / "out" / "case.nii.gz")
    assert_one_line_error(result, "predict", "case.json", "--overwrite")
    assert snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_take_the_users_umask(checkpoint, tmp_path, capsys, umask):
    source, _ = _volume(tmp_path / "in")
    previous = os.umask(umask)
    try:
        assert _predict(capsys, checkpoint, source, tmp_path / "out" / "scan.nii.gz").rc == 0
    finally:
        os.umask(previous)
    for name in ("scan.nii.gz", "scan.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask


def test_a_concept_the_checkpoint_never_saw_is_warned_about(checkpoint, tmp_path, capsys):
    source, _ = _volume(tmp_path / "in")
    result = _predict(capsys, checkpoint, source, tmp_path / "o.nii.gz", "--concept", "disc", "--concept", "liver")
    assert result.rc == 0
    warnings = [line for line in result.err.splitlines() if line.startswith("dasam3 predict: warning: the checkpoint "
                                                                           "was not trained on")]
    assert len(warnings) == 1 and "['liver']" in warnings[0] and "disc" not in warnings[0].split("(")[0]


def test_the_model_runs_on_the_meta_device(checkpoint):
    """Shape inference without memory (what the loaders' checks build on): no autocast error."""
    config = DASAM3Config.load(checkpoint / "config.json")
    with torch.device("meta"):
        model = DASAM3(config).apply_variant("da-sam3")
        logits = model(torch.zeros(2, 1, 16, 16), torch.zeros(2, 3, 8))
    assert logits.shape == (2, 3, 16, 16) and logits.is_meta

"""Slice layout orientation, NIfTI reading errors, atomic label-map writing that keeps geometry."""

import gzip

import numpy as np
import pytest

from dasam3.io import (DataError, SliceLayout, atomic_output, check_can_write, load_nifti,
                       read_nifti_slices, save_label_map)
from tests.medical_files import nib, oblique_affine, world_coordinates, write_nifti

AFFINES = {
    "oblique": oblique_affine(),
    "lps": np.diag([-0.7, -0.7, 2.5, 1.0]),
    "ras": np.diag([1.0, 2.0, 3.0, 1.0]),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_axial_layout_runs_superior_posterior_left(name):
    """Whatever the storage order: axis 0 goes up (S), rows go back (P), columns go to the left (L)."""
    affine, shape = AFFINES[name], (5, 6, 7)
    layout = SliceLayout.from_affine(affine)
    x, y, z = (layout.to_slices(c) for c in world_coordinates(shape, affine))
    assert (np.diff(z.mean(axis=(1, 2))) > 0).all()  # superior with the slice index
    assert (np.diff(y.mean(axis=(0, 2))) < 0).all()  # anterior at row 0
    assert (np.diff(x.mean(axis=(0, 1))) < 0).all()  # patient right (large x) at column 0
    data = np.arange(np.prod(shape)).reshape(shape)
    np.testing.assert_array_equal(layout.from_slices(layout.to_slices(data)), data)


def test_layout_spacing_follows_the_axes():
    layout = SliceLayout.from_affine(oblique_affine(spacing=(0.8, 1.5, 3.0)))
    # file axis 0 (0.8 mm) is closest to I/S, axis 1 (1.5 mm) to L/R, axis 2 (3 mm) to A/P.
    assert layout.spacing == pytest.approx((0.8, 3.0, 1.5))


def test_native_plane_keeps_the_third_axis():
    layout = SliceLayout.from_affine(oblique_affine(), plane="native")
    data = np.zeros((4, 5, 6))
    assert layout.to_slices(data).shape == (6, 5, 4)
    with pytest.raises(ValueError, match="plane must be one of.*'coronal'"):
        SliceLayout.from_affine(np.eye(4), plane="coronal")


def test_read_nifti_slices_applies_scaling_and_layout(tmp_path):
    data = np.random.default_rng(0).integers(-500, 500, (4, 5, 6)).astype(np.int16)
    path = write_nifti(tmp_path / "ct.nii.gz", data, oblique_affine(), slope_inter=(2.0, -10.0))
    slices, layout, image = read_nifti_slices(path)
    np.testing.assert_allclose(layout.from_slices(slices), data * 2.0 - 10.0)
    np.testing.assert_allclose(image.affine, oblique_affine())


def test_missing_unreadable_and_4d_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.nii.gz"):
        load_nifti(tmp_path / "absent.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 10))
    with pytest.raises(DataError, match="garbage.nii.gz"):
        load_nifti(garbage)
    truncated = tmp_path / "truncated.nii.gz"
    full = write_nifti(tmp_path / "full.nii.gz", np.ones((20, 20, 20), np.float32)).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="truncated.nii.gz"):
        read_nifti_slices(truncated)
    cine = write_nifti(tmp_path / "cine.nii.gz", np.zeros((4, 4, 3, 2), np.float32))
    with pytest.raises(DataError, match=r"cine.nii.gz: expected a 3-D volume, got shape \(4, 4, 3, 2\)"):
        read_nifti_slices(cine)


@pytest.mark.parametrize("max_label, dtype", [(7, np.uint8), (300, np.int16)])
def test_save_label_map_keeps_geometry_and_header(tmp_path, max_label, dtype):
    reference = nib.load(str(write_nifti(tmp_path / "in.nii.gz", np.zeros((4, 5, 6), np.int16),
                                         oblique_affine(), slope_inter=(2.0, -1024.0))))
    labels = np.zeros((4, 5, 6), np.int64)
    labels[1, 2, 3], labels[3, 0, 5] = 1, max_label
    save_label_map(labels, reference, tmp_path / "out.nii.gz")
    written = nib.load(str(tmp_path / "out.nii.gz"))
    assert written.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)
    np.testing.assert_allclose(written.affine, reference.affine)
    for field in ("qform_code", "sform_code", "descrip", "xyzt_units"):
        assert written.header[field] == reference.header[field]
    np.testing.assert_allclose(written.header.get_zooms(), reference.header.get_zooms())
    np.testing.assert_allclose(written.header.get_qform(), reference.header.get_qform())
    assert written.dataobj.slope == 1.0 and written.dataobj.inter == 0.0
    with pytest.raises(ValueError, match=r"shape must equal the image's \(4, 5, 6\), got \(4, 5\)"):
        save_label_map(labels[:, :, 0], reference, tmp_path / "bad.nii.gz")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with atomic_output(target) as temporary:
        assert temporary.name.endswith(".json") and temporary.parent == tmp_path
        temporary.write_text("new")
    assert target.read_text() == "new"


def test_check_can_write_lists_existing_outputs(tmp_path):
    (tmp_path / "a.nii.gz").write_text("x")
    with pytest.raises(FileExistsError, match="a.nii.gz"):
        check_can_write([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], overwrite=False)
    check_can_write([tmp_path / "a.nii.gz"], overwrite=True)


def test_check_writable_probes_the_folder_that_will_receive_the_files(tmp_path):
    from dasam3.io import DestinationError, check_writable
    from tests.faults.tools import unwritable_folder

    check_writable(tmp_path / "new" / "nested")  # created later: its existing ancestor is probed
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="file is not a folder"):
        check_writable(tmp_path / "file" / "out")
    with unwritable_folder(tmp_path) as folder, pytest.raises(DestinationError, match=str(folder)):
        check_writable(folder / "out")


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_atomic_outputs_take_the_umask(tmp_path, umask):
    import os
    import stat

    from dasam3.io import write_text

    previous = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "text")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_weights_are_refused_when_not_finite_or_not_matching(tmp_path):
    import torch
    from safetensors.torch import save_file

    from dasam3.io import check_weights_fit, load_safetensors

    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.tensor([[1.0, float("inf")]]), "steps": torch.tensor([3])}, str(path))
    with pytest.raises(DataError, match=r"w.safetensors: 1 weight tensor\(s\) hold NaN or inf values \(weight\)"):
        load_safetensors(path)
    with pytest.raises(DataError, match=r"weight has shape \[1, 2\] in the weights, the config makes it \[4, 3\]"):
        check_weights_fit(lambda: torch.nn.Linear(3, 4, bias=False), path, tmp_path / "config.json")


def test_check_fields_names_the_option_and_the_expected_type():
    from dataclasses import dataclass, field

    from dasam3._common import check_fields

    @dataclass
    class Inner:
        rate: float = 0.1

    @dataclass
    class Outer:
        count: int = 1
        names: list[str] = field(default_factory=list)
        inner: Inner | None = None
        mode: str | list[int] = "all"

    check_fields(Outer, {"count": 2, "names": ["a"], "inner": {"rate": 1}, "mode": [0, 1]})
    for values, message in [({"count": True}, "count must be an integer, got True"),
                            ({"names": ["a", 3]}, r"names\[1\] must be a string"),
                            ({"inner": {"rate": "1e-3"}}, "inner.rate must be a number.*write 5.0e-4"),
                            ({"inner": {"rat": 1}}, r"unknown option\(s\) \['inner.rat'\]"),
                            ({"mode": 3}, "mode must be a string or a list")]:
        with pytest.raises(ValueError, match=message):
            check_fields(Outer, values)

"""Reading and writing medical volumes without losing their geometry.

Every loader and the `predict` command see a 3-D image in one *slice layout*: a NumPy array
`[S, H, W]` whose axis 0 runs inferior → superior, axis 1 anterior → posterior (row 0 is the most
anterior) and axis 2 patient right → left (column 0 is the patient's right, so `imshow` of a slice
shows the usual radiological axial view). `SliceLayout` maps a file's voxel array to that layout and
back with nibabel's orientation tools, so predictions land in the input's own voxel grid and are
written with its affine and header.

Bad data raises `DataError` (a ValueError) or FileNotFoundError; both name the offending file.
Outputs are written atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

Plane = Literal["axial", "native"]
PLANES: tuple[str, ...] = ("axial", "native")
# Intensity settings shared by the loaders and `dasam3 predict` (re-exported by `dasam3.data.transforms`;
# kept here so the commands can use them without importing torch).
Modality = Literal["ct", "mri"]
MODALITIES: tuple[str, ...] = ("mri", "ct")
CT_WINDOW: tuple[float, float] = (-125.0, 275.0)  # Hounsfield units, TransUNet's abdominal window

# Axis codes of the slice layout [S, H, W]: index grows toward Superior, Posterior, Left.
SLICE_AXCODES = ("S", "P", "L")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DataError(ValueError):
    """A data file that exists but cannot be used (unreadable, wrong shape, unknown label values)."""


def _nibabel():
    try:
        import nibabel
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "reading NIfTI files needs nibabel: pip install 'dasam3[medical]'"
        ) from error
    return nibabel


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    """`case.nii.gz` → `case` (the name without its NIfTI suffix)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def load_nifti(path: str | os.PathLike):
    """Open a NIfTI file (data are read lazily). Raises FileNotFoundError or DataError naming it."""
    nib = _nibabel()
    path = require_file(path, "NIfTI file")
    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"{path}: cannot read as NIfTI ({error})") from error
    if not hasattr(image, "affine") or not hasattr(image, "dataobj"):
        raise DataError(f"{path}: not a NIfTI image (got {type(image).__name__})")
    return image


def read_array(image, path: str | os.PathLike) -> np.ndarray:
    """The voxel array of an opened image (scaling applied), with errors reported against `path`."""
    try:
        return np.asarray(image.dataobj)
    except Exception as error:  # truncated or corrupt compressed data
        raise DataError(f"{path}: cannot read the voxel data ({error})") from error


def require_3d(shape: Sequence[int], path: str | os.PathLike) -> tuple[int, int, int]:
    """Accept [X, Y, Z] or [X, Y, Z, 1]; anything else is an error naming the file."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {shape}")
    return shape


def read_volume(path: str | os.PathLike):
    """Open a 3-D NIfTI file and read its voxels: (data [X, Y, Z] in the file's voxel order, image).

    A trailing singleton 4th axis is dropped; errors (missing, unreadable, not 3-D) name the file.
    """
    image = load_nifti(path)
    shape = require_3d(image.shape, path)
    return read_array(image, path).reshape(shape), image


@dataclass(frozen=True)
class SliceLayout:
    """The map between a file's voxel array `[X, Y, Z]` and the slice layout `[S, H, W]`.

    plane="axial" reorients by the affine (nibabel's `io_orientation`, closest canonical axes), so the
    slices are axial whatever the file's storage order. plane="native" keeps the file's third array
    axis as the slice axis (an acquisition stack such as ACDC's short-axis slices) and treats the
    voxel axes as if they were R, A, S.
    """

    to_layout: np.ndarray  # nibabel ornt [3, 2]: file array → slice layout
    from_layout: np.ndarray  # nibabel ornt [3, 2]: slice layout → file array
    spacing: tuple[float, float, float]  # voxel size in mm along (S, H, W)

    @classmethod
    def from_affine(cls, affine: np.ndarray, plane: Plane = "axial") -> "SliceLayout":
        nib = _nibabel()
        from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

        if plane not in PLANES:
            raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
        affine = np.asarray(affine, dtype=np.float64)
        source = io_orientation(affine) if plane == "axial" else axcodes2ornt(("R", "A", "S"))
        target = axcodes2ornt(SLICE_AXCODES)
        to_layout = ornt_transform(source, target)
        voxel_sizes = nib.affines.voxel_sizes(affine)[:3]
        spacing = [0.0, 0.0, 0.0]
        for file_axis, (layout_axis, _flip) in enumerate(to_layout):
            spacing[int(layout_axis)] = float(voxel_sizes[file_axis])
        return cls(to_layout, ornt_transform(target, source), tuple(spacing))

    def to_slices(self, data: np.ndarray) -> np.ndarray:
        """data: [X, Y, Z] in the file's voxel order → [S, H, W] (a contiguous copy)."""
        from nibabel.orientations import apply_orientation

        return np.ascontiguousarray(apply_orientation(data, self.to_layout))

    def from_slices(self, data: np.ndarray) -> np.ndarray:
        """data: [S, H, W] → [X, Y, Z] in the file's voxel order (inverse of `to_slices`)."""
        from nibabel.orientations import apply_orientation

        return np.ascontiguousarray(apply_orientation(data, self.from_layout))


def read_nifti_slices(path: str | os.PathLike, plane: Plane = "axial"):
    """Read a 3-D NIfTI file into the slice layout.

    Returns (data [S, H, W], layout, image) where `image` is the opened nibabel image (its affine and
    header are what a prediction is written back with).
    """
    data, image = read_volume(path)
    layout = SliceLayout.from_affine(image.affine, plane)
    return layout.to_slices(data), layout, image


def label_dtype(max_label: int):
    """uint8 for up to 255 labels, int16 beyond (NIfTI's common integer label types)."""
    return np.uint8 if max_label <= np.iinfo(np.uint8).max else np.int16


def check_can_write(paths: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """Refuse (before any work is done) to replace existing files unless overwrite is set."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            "output already exists (pass --overwrite to replace it): " + ", ".join(existing)
        )


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` with the same suffixes; rename it onto `path` on success.

    The suffixes are kept so that writers that choose a format by name (nibabel's `.nii.gz`) behave as
    they would for the final name. On an exception the temporary file is removed and `path` is left
    as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial" + suffix,
                                         dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def save_label_map(labels: np.ndarray, reference, path: str | os.PathLike) -> None:
    """Write `labels` (in the reference image's voxel grid) with its affine and header, atomically.

    labels: integer [X, Y, Z] with the reference's 3-D shape. The header is the reference's with the
    data type set to uint8/int16 and any intensity scaling removed (labels must be stored as is).
    """
    nib = _nibabel()
    shape = tuple(reference.shape[:3])
    if labels.shape != shape:
        raise ValueError(f"label map shape must equal the image's {shape}, got {labels.shape}")
    dtype = label_dtype(int(labels.max(initial=0)))
    header = reference.header.copy()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    image = type(reference)(labels.astype(dtype), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, int(labels.max(initial=0))
    with atomic_output(path) as temporary:
        nib.save(image, str(temporary))

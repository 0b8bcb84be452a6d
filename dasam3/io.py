"""Reading and writing medical volumes without losing their geometry.

Every loader and the `predict` command see a 3-D image in one *slice layout*: a NumPy array
`[S, H, W]` whose axis 0 runs inferior → superior, axis 1 anterior → posterior (row 0 is the most
anterior) and axis 2 patient right → left (column 0 is the patient's right, so `imshow` of a slice
shows the usual radiological axial view). `SliceLayout` maps a file's voxel array to that layout and
back with nibabel's orientation tools, so predictions land in the input's own voxel grid and are
written with its affine and header.

Bad data raises `DataError` (a ValueError) or FileNotFoundError; both name the offending file.
Outputs are written atomically (a temporary file in the same folder, then a rename) with the mode the
user's umask gives a new file; destinations are probed for writability before any work is done.
Model files (`model.safetensors`, `config.json`) are read by `load_safetensors` / `read_json`, which
name the file on any corruption and refuse weights that hold NaN or inf.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

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


class DestinationError(ValueError):
    """An output destination that cannot receive files (read-only, not a folder, no space)."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (libraries' messages often span several), or its type."""
    return " ".join(str(error).split()) or type(error).__name__


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
        raise DataError(f"{path}: cannot read as NIfTI ({one_line(error)})") from error
    if not hasattr(image, "affine") or not hasattr(image, "dataobj"):
        raise DataError(f"{path}: not a NIfTI image (got {type(image).__name__})")
    return image


def read_array(image, path: str | os.PathLike) -> np.ndarray:
    """The voxel array of an opened image (scaling applied), with errors reported against `path`."""
    try:
        return np.asarray(image.dataobj)
    except Exception as error:  # truncated or corrupt compressed data
        raise DataError(f"{path}: cannot read the voxel data ({one_line(error)})") from error


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
    """Refuse (before any work is done) to replace existing files unless overwrite is set, and
    to write into a folder that cannot take new files (`check_writable`)."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            "output already exists (pass --overwrite to replace it): " + ", ".join(existing)
        )
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        check_writable(folder)


def check_writable(folder: str | os.PathLike) -> None:
    """Raise DestinationError unless files can be created in `folder` (or, when it does not exist yet,
    in its nearest existing ancestor, where it will be created).

    The probe creates and removes a real temporary file: `os.access` is not enough, since it says yes to
    root on an immutable folder and cannot see a full disk.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise DestinationError(f"cannot write into {folder}: {existing} is not a folder")
    try:
        handle, probe = tempfile.mkstemp(prefix=".dasam3-write-probe.", dir=existing)
    except OSError as error:
        raise DestinationError(f"cannot write into {folder}: {error.strerror} ({existing})") from error
    os.close(handle)
    os.unlink(probe)


def creation_mode(directory: bool = False) -> int:
    """The mode `open`/`mkdir` give a new file (0o666) or folder (0o777) under the current umask
    (temporary files are created 0600/0700, so outputs made from them are set to this)."""
    return (0o777 if directory else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it to read it back
    would, for an instant, give files another thread creates the wrong mode)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        os.chmod(temporary, creation_mode())
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


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; FileNotFoundError or DataError naming it."""
    path = require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({one_line(error)})") from error


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """name → shape of every tensor in a safetensors file, from its header only (nothing is allocated).
    A corrupt, truncated or forged header is a DataError naming the file."""
    from safetensors import SafetensorError, safe_open

    path = require_file(path, "weights file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: not a readable safetensors file ({one_line(error)})") from error


def load_safetensors(path: str | os.PathLike) -> dict:
    """name → tensor of a safetensors file (CPU). DataError naming the file when it is corrupt or when a
    floating-point tensor holds NaN or inf (such weights silently turn every prediction into noise)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = require_file(path, "weights file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise DataError(f"{path}: not a readable safetensors file ({one_line(error)})") from error
    non_finite = [name for name, tensor in tensors.items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if non_finite:
        shown = ", ".join(non_finite[:5]) + (", ..." if len(non_finite) > 5 else "")
        raise DataError(f"{path}: {len(non_finite)} weight tensor(s) hold NaN or inf values ({shown})")
    return tensors


def check_weights_fit(build: Callable[[], Any], weights: str | os.PathLike, config: str | os.PathLike) -> None:
    """Build the module `build()` returns on the meta device (no memory is allocated) and compare its
    tensor shapes with the weights file's header, so a config that disagrees with its weights (a
    forged `d_ff: 1000000000`) is a DataError naming both files instead of a huge allocation."""
    import torch

    stored = safetensors_shapes(weights)
    try:
        with torch.device("meta"):
            skeleton = build()
    except RuntimeError:  # parts that load their own weights (transformers' from_pretrained) refuse meta:
        return  # the real build reads those from their own files, and the file's shapes are checked there
    for name, tensor in skeleton.state_dict().items():
        if name in stored and tuple(tensor.shape) != stored[name]:
            raise DataError(f"{config} does not match {weights}: {name} has shape {list(stored[name])} in "
                            f"the weights, the config makes it {list(tensor.shape)}")


def create_new_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file that must not exist yet: FileExistsError if it does, even when another process
    creates it at the same moment (O_EXCL), so the file can claim a folder for one writer."""
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)


def load_config(path: str | os.PathLike, config_cls: type) -> Any:
    """`config_cls.from_dict` of a JSON file, every field's name and type checked first (so `d_ff: 1e9`
    is refused as a float); FileNotFoundError or DataError naming the file."""
    from ._common import check_fields

    data = read_json(path, "config file")
    try:
        check_fields(config_cls, data)
        return config_cls.from_dict(data)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: {error}") from None

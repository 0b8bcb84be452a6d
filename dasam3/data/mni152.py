"""The embedded real default: nilearn's MNI152 T1 template with a gray / white matter label map.

Everything comes from files nilearn ships (offline): `load_mni152_template`, `load_mni152_gm_template`,
`load_mni152_wm_template` and `load_mni152_brain_mask`, at `resolution` mm (2 by default: 99×117×95).

Label map: inside the brain mask, a voxel is tissue when its gray- plus white-matter probability is at
least `TISSUE_THRESHOLD` = 0.5 (tissue outweighs CSF and everything else), and then gray matter (1)
or white matter (2) by the larger of the two probabilities (ties → gray matter); everything else is
background (0). Concepts: "gray matter", "white matter", and "brain" (the union of both, the
generic concept for a first training stage).

Image: the T1 template scaled like `dasam3 predict --modality mri` scales any MRI (the volume's 0.5 /
99.5 percentiles → [0, 1]), in the slice layout of `dasam3.io` (axial slices, anterior at the top,
the patient's right on the left), so predicting on the template file gives exactly the training
inputs. (nilearn's template header says uint8: export it with `set_data_dtype(np.float32)` before
`to_filename`, or the file holds quantised intensities.)

Split: axial slabs by MNI z (mm, slice centres, inclusive), disjoint with 4 mm gaps:
train = [-40, -6] ∪ [22, 70], test (held out) = [0, 16]. At 2 mm that is 18 + 25 training and 9 test
slices. The volumes load once per process (about 1.5 s) and stay cached.
"""

from __future__ import annotations

import functools

import numpy as np

from ..io import SliceLayout
from .base import ArrayCase, Case, SliceDataset, Volume, split_members
from .transforms import normalize_mri

MNI152_CLASSES = ("gray matter", "white matter")
MNI152_EXTRA_CONCEPTS = {"brain": (1, 2)}
MNI152_SLABS_MM = {"train": ((-40.0, -6.0), (22.0, 70.0)), "test": ((0.0, 16.0),)}
MNI152_IMAGE_SIZE = 128
TISSUE_THRESHOLD = 0.5


def _nilearn_datasets():
    try:
        from nilearn import datasets
    except ImportError as error:  # pragma: no cover - only without the extra
        raise ImportError("the MNI152 default needs nilearn: pip install 'dasam3[medical]'") from error
    return datasets


def tissue_labels(gray: np.ndarray, white: np.ndarray, brain_mask: np.ndarray,
                  threshold: float = TISSUE_THRESHOLD) -> np.ndarray:
    """Label map (0 background, 1 gray matter, 2 white matter) from probability maps, any shape."""
    tissue = brain_mask.astype(bool) & (gray + white >= threshold)
    return np.where(tissue, np.where(white > gray, 2, 1), 0).astype(np.int64)


@functools.lru_cache(maxsize=2)
def mni152_volume(resolution: int = 2) -> tuple[Volume, np.ndarray]:
    """The whole template as a Volume in the slice layout, and the MNI z (mm) of each slice.

    Cached: later calls return the same objects (do not modify them).
    """
    datasets = _nilearn_datasets()
    template = datasets.load_mni152_template(resolution=resolution)
    affine = template.affine
    if not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3]))) or (np.diag(affine)[:3] <= 0).any():
        raise RuntimeError(f"expected an axis-aligned RAS MNI152 template, got affine {affine.tolist()}")

    def voxels(image) -> np.ndarray:
        return np.asarray(image.dataobj, dtype=np.float32)

    labels = tissue_labels(voxels(datasets.load_mni152_gm_template(resolution=resolution)),
                           voxels(datasets.load_mni152_wm_template(resolution=resolution)),
                           voxels(datasets.load_mni152_brain_mask(resolution=resolution)) > 0)
    layout = SliceLayout.from_affine(affine)
    volume = Volume(layout.to_slices(normalize_mri(voxels(template))), layout.to_slices(labels),
                    layout.spacing, f"mni152_{resolution}mm", affine, layout)
    z_mm = affine[2, 2] * np.arange(template.shape[2]) + affine[2, 3]
    return volume, z_mm


def mni152_cases(split: str = "train", resolution: int = 2) -> list[Case]:
    """One in-memory case per slab of the split (see the module docstring)."""
    volume, z_mm = mni152_volume(resolution)
    cases = []
    for low, high in split_members(MNI152_SLABS_MM, split, "MNI152"):
        chosen = np.flatnonzero((z_mm >= low - 1e-6) & (z_mm <= high + 1e-6))
        band = slice(chosen[0], chosen[-1] + 1)
        cases.append(ArrayCase(f"mni152_z{low:+.0f}_{high:+.0f}mm", volume.image[band],
                               volume.label[band], volume.spacing))
    return cases


class MNI152Dataset(SliceDataset):
    """Axial MNI152 slices with "gray matter", "white matter" and "brain" masks.

    image_size defaults to 128 (the 2 mm template is 99×117 in-plane); any size works.
    """

    def __init__(self, split: str = "train", *, resolution: int = 2,
                 image_size: int = MNI152_IMAGE_SIZE, **options):
        options.setdefault("extra_concepts", MNI152_EXTRA_CONCEPTS)
        super().__init__(mni152_cases(split, resolution), MNI152_CLASSES, image_size=image_size,
                         **options)
        self.record_preprocessing("mni152", "mri", None, "axial")

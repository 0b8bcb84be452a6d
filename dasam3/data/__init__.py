"""Medical segmentation data: one module per dataset, a common slice dataset, augmentation.

    from torch.utils.data import DataLoader
    from dasam3.data import load_dataset, collate_slices

    train = load_dataset("mni152", split="train", augment=True)      # no files needed
    loader = DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate_slices)
    batch = next(iter(loader))    # image [8, 1, 128, 128], masks [8, 3, 128, 128], concepts, ...
    for volume in load_dataset("mni152", split="test").volumes():   # whole volumes for 3-D scoring
        ...

Item and volume formats: `dasam3.data.base`. Datasets that read files take `root` (the folder the user
already has; nothing is downloaded).
"""

from __future__ import annotations

from .acdc import ACDC_CLASSES, ACDC_SPLITS, ACDCDataset, acdc_cases
from .augment import Augmentation
from .base import (ArrayCase, Case, DataWarning, LabelRemap, NiftiCase, SliceDataset, Volume, collate_slices)
from .btcv import BTCV_CLASSES, BTCV_SPLITS, BTCVDataset, btcv_cases
from .mmwhs import MMWHS_CLASSES, MMWHS_SPLIT_SCHEMES, MMWHS_SPLITS, MMWHSDataset, mmwhs_cases
from .mni152 import MNI152_CLASSES, MNI152_SLABS_MM, MNI152Dataset, mni152_cases, mni152_volume
from .preprocessing import Preprocessing
from .synapse import SYNAPSE_CLASSES, SYNAPSE_SPLITS, SYNAPSE_TABLE_ORDER, SynapseDataset, synapse_cases
from .synthetic import SYNTHETIC_CLASSES, SyntheticDataset, synthetic_cases
from .transforms import normalize, normalize_ct, normalize_mri, resize_images, resize_labels
from ..io import DataError

DATASETS = {
    "synapse": SynapseDataset,
    "btcv": BTCVDataset,
    "acdc": ACDCDataset,
    "mmwhs": MMWHSDataset,
    "mni152": MNI152Dataset,
    "synthetic": SyntheticDataset,
}
# Datasets built from files a user supplies (the others are embedded or generated).
NEEDS_ROOT = ("synapse", "btcv", "acdc", "mmwhs")


def load_dataset(name: str, root=None, split: str = "train", **options) -> SliceDataset:
    """A dataset by name. root: the data folder (synapse, btcv, acdc, mmwhs); options go to the
    dataset class (image_size, channels, augment, seed, cache, ...)."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if name in NEEDS_ROOT:
        if root is None:
            raise ValueError(f"dataset {name!r} reads your files: pass root=<folder>")
        return DATASETS[name](root, split, **options)
    if root is not None:
        raise ValueError(f"dataset {name!r} needs no files, got root={root!r}")
    return DATASETS[name](split, **options)


__all__ = [
    "ACDCDataset", "ACDC_CLASSES", "ACDC_SPLITS", "acdc_cases", "ArrayCase", "Augmentation",
    "BTCVDataset", "BTCV_CLASSES", "BTCV_SPLITS", "btcv_cases", "Case", "DATASETS", "DataError",
    "DataWarning", "LabelRemap", "MMWHSDataset", "MMWHS_CLASSES", "MMWHS_SPLIT_SCHEMES", "MMWHS_SPLITS", "mmwhs_cases", "MNI152Dataset",
    "MNI152_CLASSES", "MNI152_SLABS_MM", "mni152_cases", "mni152_volume", "NiftiCase",
    "Preprocessing", "SliceDataset", "SyntheticDataset", "SYNTHETIC_CLASSES", "synthetic_cases", "SynapseDataset",
    "SYNAPSE_CLASSES", "SYNAPSE_SPLITS", "SYNAPSE_TABLE_ORDER", "synapse_cases", "Volume", "collate_slices",
    "load_dataset", "normalize", "normalize_ct", "normalize_mri", "resize_images", "resize_labels",
]

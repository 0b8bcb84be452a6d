"""How a dataset turns raw volumes into model inputs, recorded beside a checkpoint.

A trainer writes `preprocessing.json` next to the model's `config.json`; `dasam3 predict` reads it, so
a CT model is windowed as it was trained and an ACDC model is sliced along its native axis without the
user repeating the flags (flags still override, with a warning). Checkpoints written before this
record existed simply have no such file.

    {"dataset": "synapse", "modality": "ct", "ct_window": [-125.0, 275.0], "plane": "axial",
     "image_size": 224, "channels": 1, "source": "h5"}

modality: "ct", "mri", or null (inputs that are generated, not read from scans). ct_window: [low, high]
in HU; a bound written "pNN" is the volume's NN-th percentile (see `dasam3.data.transforms`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

PREPROCESSING_NAME = "preprocessing.json"


@dataclass(frozen=True)
class Preprocessing:
    """The settings of one dataset's inputs (see the module docstring)."""

    dataset: str
    modality: str | None
    ct_window: tuple[float | str, float | str] | None
    plane: str
    image_size: int
    channels: int = 1
    source: str | None = None

    def __post_init__(self):
        if self.ct_window is not None:
            object.__setattr__(self, "ct_window", tuple(self.ct_window))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `folder/preprocessing.json` atomically; returns its path."""
        from ..io import write_text

        path = Path(folder) / PREPROCESSING_NAME
        write_text(path, json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Preprocessing | None":
        """The record of a checkpoint folder, or None when it has none (an older checkpoint)."""
        path = Path(folder) / PREPROCESSING_NAME
        if not path.is_file():
            return None
        values = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or not {"dataset", "modality", "plane", "image_size"} <= set(values):
            raise ValueError(f"{path}: expected a preprocessing record with dataset, modality, plane and "
                             f"image_size, got {values!r}")
        return cls(**{k: v for k, v in values.items() if k in known})


def window_values(window: Sequence[float | str]) -> tuple[float | str, float | str]:
    """A CT window as stored: floats, or "pNN" percentile bounds kept as strings."""
    if len(window) != 2:
        raise ValueError(f"a CT window is (low, high), got {tuple(window)}")
    return tuple(w if isinstance(w, str) and w.startswith("p") else float(w) for w in window)

"""Training configuration: a YAML file and/or command-line flags, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGE_KINDS = ("pretrain", "warmup", "calibrate")


@dataclass
class StageConfig:
    """One training stage.

    kind: "pretrain" trains the whole model but its frozen encoders (the CPU demo's stand-in for
    SAM3's pretraining); "warmup" and "calibrate" are the paper's two stages (`mark_trainable`).
    concepts: the dataset concepts this stage trains on (None: all of them).
    variant: a `DASAM3.apply_variant` name applied before the stage (once), with variant_options.
    """

    kind: str
    steps: int
    lr: float = 5e-4
    concepts: list[str] | None = None
    variant: str | None = None  # applied to the model before the stage, e.g. "da-sam3" (its upcycle)
    variant_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"stage kind must be one of {STAGE_KINDS}, got {self.kind!r}")
        if self.steps < 0:
            raise ValueError(f"stage steps must be >= 0, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"stage lr must be > 0, got {self.lr}")


def _paper_stages() -> list[StageConfig]:
    return [StageConfig("warmup", 2000), StageConfig("calibrate", 500)]


@dataclass
class TrainConfig:
    """Everything a run needs besides the model (SPEC section 3's defaults)."""

    dataset: str = "mni152"
    data_root: str | None = None
    image_size: int | None = None  # None: the dataset's default
    stages: list[StageConfig] = field(default_factory=_paper_stages)
    batch_size: int = 8
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05  # of each stage's steps: linear warm-up, then cosine to zero
    grad_clip: float = 1.0
    balance: float = 0.01
    sparse: float = 0.001
    augment: bool = True
    amp: bool = True  # bf16 autocast on GPUs; ignored on the CPU
    seed: int = 0
    val_every: int = 200
    checkpoint_every: int = 200
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self):
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        for name in ("batch_size", "val_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """The file's options, with `overrides` (flags given on the command line) taking precedence."""
        values = read_yaml_options(path)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)


def read_yaml_options(path: str | Path) -> dict[str, Any]:
    """A YAML file of options as a dict (an empty file: none); ValueError unless it holds a mapping."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of training options, got {type(values).__name__}")
    return values

"""Checkpoints that survive a crash: each is written to a temporary folder and renamed into place,
and `last` / `best` are symbolic links swapped atomically, so a reader never sees half a checkpoint.

A checkpoint folder holds the model (`config.json` + `model.safetensors`, what `dasam3 predict
--checkpoint` reads), the adapter alone (`adapter.safetensors` + `adapter.json`) and the resume state
(`trainer_state.pt`: progress, optimizer, scheduler, RNG; loaded with `weights_only=True`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

TRAINER_STATE = "trainer_state.pt"


def write_checkpoint(root: Path, name: str, write: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
    """root/name, written by `write(folder)` plus the trainer state, atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write(staging)
        torch.save(trainer_state, staging / TRAINER_STATE)
        if final.exists():  # the same step again (after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def point(link: Path, target: Path) -> None:
    """Make `link` a symbolic link to `target` (relative), replacing any previous link atomically."""
    staging = link.with_name(f".{link.name}.{os.getpid()}")
    if staging.is_symlink() or staging.exists():
        staging.unlink()
    staging.symlink_to(os.path.relpath(target, link.parent))
    os.replace(staging, link)


def prune(root: Path, keep: set[Path]) -> None:
    """Remove the checkpoint folders under `root` that no link points to (and stale staging folders)."""
    keep = {k.resolve() for k in keep}
    for folder in root.iterdir():
        if folder.is_dir() and not folder.is_symlink() and folder.resolve() not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trainer state to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

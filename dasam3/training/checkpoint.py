"""Checkpoints that survive a crash: each is written to a temporary folder and renamed into place,
and `last` / `best` are symbolic links swapped atomically, so a reader never sees half a checkpoint.

A checkpoint folder holds the model (`config.json` + `model.safetensors`, what `dasam3 predict
--checkpoint` reads), the adapter alone (`adapter.safetensors` + `adapter.json`) and the resume state
(`trainer_state.pt`: progress, optimizer, scheduler, RNG; loaded with `weights_only=True`).

The checkpoint before `last` is kept too, so that a resume whose newest checkpoint was damaged after
it was written (a truncated copy, a full disk, a dangling link) falls back to an intact one
(`find_resumable`), saying which it skipped and why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from dasam3.io import DataError, creation_mode, load_safetensors, one_line, read_json

TRAINER_STATE = "trainer_state.pt"
STATE_KEYS = ("progress", "optimizer", "scheduler", "rng", "config")
MODEL_FILES = ("config.json", "model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (truncated, corrupt, forged, incomplete)."""


def write_checkpoint(root: Path, name: str, write: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
    """root/name, written by `write(folder)` plus the trainer state, atomically."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        os.chmod(staging, creation_mode(directory=True))  # mkdtemp makes it 0700
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
    """The resume state of a checkpoint folder; CheckpointError naming the file when it is unusable."""
    path = checkpoint / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trainer state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, refused pickle, bad storage: torch raises many types
        raise CheckpointError(f"{path}: cannot load the trainer state ({one_line(error)})") from error
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a dasam3 trainer state (missing {missing})")
    return state


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Load every file a resume needs from `folder` (trainer state, config, weights: readable and
    finite); return the trainer state. Raises CheckpointError, DataError or FileNotFoundError."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    state = load_trainer_state(folder)
    read_json(folder / MODEL_FILES[0], "checkpoint config")
    load_safetensors(folder / MODEL_FILES[1])
    return state


def checkpoint_candidates(root: Path) -> list[Path]:
    """Where a resume may start, newest first: the target of `last`, then every step folder."""
    steps = sorted((p for p in root.glob("step-*") if p.is_dir() and not p.is_symlink()), reverse=True)
    last = root / "last"
    first = [Path(os.path.realpath(last))] if last.is_symlink() else []
    return list(dict.fromkeys(first + [p.resolve() for p in steps]))


def find_resumable(root: Path) -> tuple[Path, dict[str, Any], list[str]]:
    """(the newest intact checkpoint under root, its trainer state, one warning per newer checkpoint
    skipped). FileNotFoundError when there is none at all; CheckpointError when none is intact."""
    candidates = checkpoint_candidates(root)
    if not candidates:
        raise FileNotFoundError(f"nothing to resume: {root} holds no checkpoint")
    problems: list[tuple[Path, str]] = []
    for folder in candidates:
        try:
            state = verify_checkpoint(folder)
        except (CheckpointError, DataError, FileNotFoundError) as error:
            problems.append((folder, str(error)))
            continue
        warnings = [f"checkpoint {bad} is unusable ({why}); resuming from {folder} instead" for bad, why in problems]
        return folder, state, warnings
    raise CheckpointError(f"no intact checkpoint to resume from in {root}: " +
                          "; ".join(f"{folder}: {why}" for folder, why in problems))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

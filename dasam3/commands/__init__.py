"""The `dasam3` subcommands, one module each (see `dasam3.cli`), and what several of them share."""

from __future__ import annotations

import shutil
from pathlib import Path


def clear_output(out: Path, overwrite: bool, command: str) -> None:
    """Make room for a command's results in `out`: an empty or new folder is fine; a non-empty one is
    replaced only with --overwrite, else SystemExit (nothing a user has is deleted silently)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(f"dasam3 {command}: {out} is not empty; pass --overwrite to replace it, or choose --out")
        shutil.rmtree(out)

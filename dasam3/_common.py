"""Small helpers shared across dasam3's modules."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from torch import nn


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)` on a temporary file beside `path`, then rename it onto `path`.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def factory_of(module: nn.Module) -> dict:
    """`device` and `dtype` keywords matching the module's first parameter (for modules added beside it)."""
    param = next(module.parameters())
    return {"device": param.device, "dtype": param.dtype}

"""dasam3: Dual-Adaptive SAM3 — a routed mixture of low-rank experts over frozen FFNs, and the medical
segmentation pipeline around it."""

__version__ = "0.1.0"

_LAZY = {"save_adapter": "dasam3.adapters", "load_adapter": "dasam3.adapters"}


def __getattr__(name: str):
    # `import dasam3` stays light: torch and friends load with the first name that needs them.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dasam3' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])

"""Test-wide setup.

Triton's interpreter must be chosen before any kernel is defined, so it is switched on here, before
the package is imported, whenever no GPU is present (CI runs the Triton kernels on the CPU that way).
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)

"""The backward kernel's launch grid: token splits sized from the GPU's SM count (pure arithmetic, no GPU)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from dasam3_kernels.triton_backward import token_splits  # noqa: E402


def _waves(programs: int, sm_count: int) -> int:
    return -(-programs // sm_count)


@pytest.mark.parametrize("sm_count", [132, 108, 78], ids=["H100/H200", "A100", "H20"])
@pytest.mark.parametrize("f_tiles", [16, 32, 12])
def test_splits_fill_two_waves_without_a_third(sm_count: int, f_tiles: int):
    """T = 16384: the grid (F tiles × splits) fills two waves of one program per SM and never spills
    into a third (the former fixed target of 264 programs gave 17 × 16 = 272: three waves on 132 SMs)."""
    splits = token_splits(16384, f_tiles, sm_count)
    programs = splits * f_tiles
    assert _waves(programs, sm_count) == 2
    assert programs > 2 * sm_count - f_tiles  # no smaller grid would fill the two waves better


def test_splits_stop_at_one_per_token_tile_and_at_least_one():
    assert token_splits(100, 16, 132) == 2  # two 64-token tiles
    assert token_splits(16384, 400, 132) == 1  # more F tiles than two waves hold

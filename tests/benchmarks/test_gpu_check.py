"""benchmarks/gpu_check.sh --dry-run on this CPU: every step runs (the GPU parts skipped or at toy size)
and no result file is written, neither to $OUT nor to benchmarks/results (the wiring the one GPU run
relies on, proved before a GPU is lent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _listing(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def test_dry_run_walks_every_step_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    results = ROOT / "benchmarks" / "results"
    before = _listing(results)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, env=env, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for name in ("env", "tests", "benchmark", "training"):
        assert f"== {name}: exit code 0" in log, name
    assert "== build: skipped in a dry run" in log
    assert "torch: " in log.split("== env")[1]  # versions first
    assert "every contender ran" in log
    assert not any(out.iterdir()), sorted(out.iterdir())
    assert _listing(results) == before


def test_an_unknown_option_is_refused():
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--wet-run"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "usage" in result.stderr

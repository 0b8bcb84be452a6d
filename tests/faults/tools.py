"""Shared pieces of the fault-injection suite: running the CLI (in-process or as a subprocess that a hook
can SIGKILL), snapshots that prove earlier outputs did not change, unwritable folders the kernel enforces,
and the tiny training run every train case uses."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KILL_HOOK = Path(__file__).with_name("kill_hook.py")

# 3 + 3 steps, a checkpoint every 2 steps and at each stage's end: checkpoints at steps 2, 3, 5, 6.
TINY_RUN = {
    "dataset": "synthetic", "image_size": 32, "batch_size": 4, "augment": True, "val_every": 2,
    "checkpoint_every": 2, "val_cases": 1,
    "stages": [{"kind": "pretrain", "steps": 3, "lr": 1.0e-2},
               {"kind": "warmup", "steps": 3, "lr": 1.0e-2, "variant": "da-sam3",
                "variant_options": {"num_experts": 2, "top_k": 1, "rank": 2}}],
    "model": {"image_size": 32, "image_encoder_options": {"widths": [4, 8, 8]}, "text_encoder_options": {"dim": 8},
              "d_model": 8, "num_layers": 2, "num_heads": 2, "d_ff": 16, "mask_dim": 4},
}


@dataclass
class Result:
    rc: int
    out: str
    err: str


def write_config(path: Path, **changes) -> Path:
    """TINY_RUN with top-level `changes` (None removes a key) as YAML."""
    options = {**TINY_RUN, **changes}
    path.write_text(yaml.safe_dump({k: v for k, v in options.items() if v is not None}, sort_keys=False))
    return path


def run_cli(*args: str, hook: tuple[str, int] | None = None, timeout: float = 240) -> Result:
    """`python -m dasam3 ARGS` in a fresh process (or under the kill hook: (point, n), see kill_hook.py)."""
    command = [sys.executable, str(KILL_HOOK), hook[0], str(hook[1]), "--"] if hook else [sys.executable, "-m",
                                                                                          "dasam3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)
    return Result(done.returncode, done.stdout, done.stderr)


def run_main(capsys, *args: str) -> Result:
    """`dasam3 ARGS` in this process (fast: no new interpreter); an exception fails the test."""
    from dasam3.cli import main

    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(rc, captured.out, captured.err)


def assert_one_line_error(result: Result, command: str, *names: str, rc: int = 1) -> str:
    """The command failed with status `rc` and a single `dasam3 COMMAND: error: ...` line naming `names`,
    and printed no traceback."""
    assert "Traceback" not in result.err, result.err
    assert result.rc == rc, (result.rc, result.err)
    errors = [line for line in result.err.splitlines() if line.startswith(f"dasam3 {command}: error: ")]
    assert len(errors) == 1, result.err
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict[str, tuple[str, int] | str]:
    """relative path → (sha256, mode) of every file, or the target of every link, under folder."""
    state: dict[str, tuple[str, int] | str] = {}
    if not folder.exists():
        return state
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = os.readlink(path)
        elif path.is_file():
            state[key] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(path.stat().st_mode))
    return state


def _cannot_create_in(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


@contextlib.contextmanager
def unwritable_folder(parent: Path):
    """A folder the kernel refuses to create files in, whoever runs the tests: mode 0555 for a normal
    user; for root (whom permission bits do not stop) the immutable attribute (`chattr +i`). The refusal
    is verified with a real write before the folder is handed out. Where neither works (root on a file
    system without attributes, such as overlayfs) the case is skipped, saying so: the destination under a
    regular file, which the kernel refuses to everyone, is tested beside it everywhere."""
    folder = parent / "read-only"
    folder.mkdir()
    immutable = False
    if os.geteuid() == 0 and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    else:
        folder.chmod(0o555)
    try:
        if not _cannot_create_in(folder):
            pytest.skip(f"no way to make a folder unwritable for uid {os.geteuid()} here (chattr +i unsupported)")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)

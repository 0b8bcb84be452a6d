"""SIGKILL at chosen points of `dasam3 train` (mid-stage, before the first checkpoint, half-way through a
checkpoint write, between a checkpoint and its `last` link) and damaged resume states, then `--resume`:
the run ends bitwise equal to an uninterrupted one, and what was lost is said, naming the files."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import stat

import pytest
import torch
from safetensors.torch import load_file

from tests.faults.tools import assert_one_line_error, run_cli, run_main, snapshot

TOTAL_STEPS = 6


def _weights(run):
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


def _log(run) -> list[dict]:
    with (run / "log.csv").open() as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _assert_same_run(run, reference) -> None:
    final, expected = _weights(run), _weights(reference)
    assert final.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(final[k], expected[k])] == []
    assert _log(run) == _log(reference)


def _train(config, out, *extra, hook=None):
    return run_cli("train", "--config", config, "--out", out, "--no-eval", *extra, hook=hook)


def test_the_uninterrupted_run_validates_on_its_held_out_cases(reference):
    _, run = reference
    rows = _log(run)
    assert [int(r["step"]) for r in rows] == list(range(1, TOTAL_STEPS + 1))
    assert all(rows[i]["val_dice"] != "" for i in (1, 2, 4, 5))  # every 2 steps and at each stage's end
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()


def test_run_files_take_the_users_umask(reference):
    _, run = reference  # the subprocess inherited this process's umask
    umask = os.umask(0)
    os.umask(umask)
    for path in [run / "train_config.json", run / "log.csv", *(run / "checkpoints").glob("step-*/*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    for folder in (run / "checkpoints").glob("step-*"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


@pytest.mark.parametrize("point, count", [
    ("step", 1),   # before the first checkpoint: the resume starts again from step 0
    ("step", 4),   # inside the warm-up stage (its upcycle already drawn), last checkpoint at the boundary
    ("save", 1),   # the first checkpoint half written: nothing to resume from, so again from step 0
    ("save", 2),   # the second checkpoint half written in its staging folder
    ("link", 3),   # checkpoint 5 complete, `last` still on checkpoint 3
])
def test_sigkill_then_resume_is_bitwise_exact(reference, tmp_path, point, count):
    config, expected = reference
    out = tmp_path / "run"
    killed = _train(config, out, hook=(point, count))
    assert killed.rc == -signal.SIGKILL and "Traceback" not in killed.err
    resumed = _train(config, out, "--resume")
    assert resumed.rc == 0, resumed.err
    _assert_same_run(out, expected)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # staging cleaned


def _damage_last(run, how: str) -> str:
    last = run / "checkpoints" / "last"
    target = last.resolve()
    if how == "truncated state":
        state = target / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    elif how == "dangling link":
        shutil.rmtree(target)
    elif how == "nan weights":
        weights = load_file(str(target / "model.safetensors"))
        next(v for v in weights.values() if v.is_floating_point()).view(-1)[0] = float("nan")
        from safetensors.torch import save_file
        save_file(weights, str(target / "model.safetensors"))
    return target.name


@pytest.mark.parametrize("how", ["truncated state", "dangling link", "nan weights"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, how):
    config, expected = reference
    out = tmp_path / "run"
    shutil.copytree(expected, out, symlinks=True)
    damaged = _damage_last(out, how)
    resumed = _train(config, out, "--resume")
    assert resumed.rc == 0, resumed.err
    warning = [line for line in resumed.err.splitlines() if line.startswith("dasam3 train: warning: ")]
    assert len(warning) == 1 and damaged in warning[0] and "step-0000005" in warning[0], resumed.err
    _assert_same_run(out, expected)  # step 6 trained again from checkpoint 5: the same weights


def test_no_intact_checkpoint_is_an_error_naming_them(reference, tmp_path, capsys):
    config, expected = reference
    out = tmp_path / "run"
    shutil.copytree(expected, out, symlinks=True)
    for state in (out / "checkpoints").glob("step-*/trainer_state.pt"):
        state.write_bytes(b"")
    before = snapshot(out)
    result = run_main(capsys, "train", "--config", config, "--out", out, "--resume", "--no-eval")
    line = assert_one_line_error(result, "train", "no intact checkpoint", "trainer_state.pt", rc=2)
    assert all(name in line for name in ("step-0000005", "step-0000006"))
    assert snapshot(out) == before

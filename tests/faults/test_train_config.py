"""`dasam3 train` refuses bad configurations before anything trains: one `dasam3 train: error:` line
naming the option, exit status 2, no traceback, nothing written. `--resume` refuses changed options
unless each is named with `--override`, and records the accepted ones; run folders are never shared."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.faults.tools import assert_one_line_error, run_main, snapshot, unwritable_folder, write_config

STAGE = {"kind": "pretrain", "steps": 2, "lr": 1.0e-2}
WARMUP = {"kind": "warmup", "steps": 2, "variant": "da-sam3", "variant_options": {"num_experts": 2, "top_k": 1}}
MODEL = {"image_size": 32, "image_encoder_options": {"widths": [4, 8, 8]}, "text_encoder_options": {"dim": 8},
         "d_model": 8, "num_layers": 2, "num_heads": 2, "d_ff": 16, "mask_dim": 4}

BAD_CONFIGS = {
    "float batch size": ({"batch_size": 2.5}, ["batch_size", "2.5"]),
    "text for a bool": ({"augment": "no"}, ["augment", "'no'"]),
    "no stages": ({"stages": []}, ["stages"]),
    "no steps at all": ({"stages": [{**STAGE, "steps": 0}]}, ["stages", "at least one step"]),
    "unknown stage key": ({"stages": [{**STAGE, "step": 3}]}, ["stages[0].step"]),
    "yaml text lr": ({"stages": [{**STAGE, "lr": "5e-4"}]}, ["stages[0].lr", "5.0e-4"]),
    "negative steps": ({"stages": [{**STAGE, "steps": -1}]}, ["stages[0]", "steps"]),
    "unknown kind": ({"stages": [{**STAGE, "kind": "finetune"}]}, ["stage kind", "finetune"]),
    "unknown option": ({"epochs": 3}, ["epochs"]),
    "negative seed": ({"seed": -1}, ["seed"]),
    "unknown device": ({"device": "gpu"}, ["device", "gpu"]),
    "unknown dataset": ({"dataset": "imagenet"}, ["dataset", "imagenet"]),
    "too many held-out cases": ({"val_cases": 3}, ["val_cases"]),
    "late unknown variant": ({"stages": [STAGE, {**WARMUP, "variant": "da-sam4"}]}, ["stages[1].variant", "da-sam4"]),
    "late impossible top_k": ({"stages": [STAGE, {**WARMUP, "variant_options": {"num_experts": 2, "top_k": 9}}]},
                              ["stages[1].variant", "top_k"]),
    "text variant option": ({"stages": [STAGE, {**WARMUP, "variant_options": {"rank": "2"}}]},
                            ["stages[1].variant_options.rank"]),
    "unknown variant option": ({"stages": [STAGE, {**WARMUP, "variant_options": {"ranks": 2}}]},
                               ["stages[1].variant_options.ranks"]),
    "unknown concept": ({"stages": [{**STAGE, "concepts": ["liver"]}]}, ["stages[0].concepts", "liver"]),
    "text model width": ({"model": {**MODEL, "d_ff": "16"}}, ["model.d_ff"]),
    "float model width": ({"model": {**MODEL, "d_ff": 1e9}}, ["model.d_ff"]),
    "unknown model field": ({"model": {**MODEL, "width": 3}}, ["model.width"]),
    "no model": ({"model": None}, ["model:", "--base"]),
}


def _train(capsys, config, out, *extra):
    return run_main(capsys, "train", "--config", config, "--out", out, "--no-eval", *extra)


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configs_stop_before_anything_trains(tmp_path, capsys, case):
    changes, names = BAD_CONFIGS[case]
    config = write_config(tmp_path / "train.yaml", **{"stages": [STAGE, WARMUP], **changes})
    result = _train(capsys, config, tmp_path / "run")
    assert_one_line_error(result, "train", *names, rc=2)
    assert not (tmp_path / "run").exists()


def test_unreadable_config_files_are_named(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("stages: [unclosed\n")
    assert_one_line_error(_train(capsys, broken, tmp_path / "run"), "train", str(broken), "YAML", rc=2)
    missing = tmp_path / "missing.yaml"
    assert_one_line_error(_train(capsys, missing, tmp_path / "run"), "train", str(missing), rc=2)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert_one_line_error(_train(capsys, listed, tmp_path / "run"), "train", str(listed), rc=2)
    no_base = tmp_path / "no-base"
    config = write_config(tmp_path / "train.yaml", model=None)
    assert_one_line_error(_train(capsys, config, tmp_path / "run", "--base", no_base), "train", str(no_base), rc=2)
    assert not (tmp_path / "run").exists()


def test_unwritable_destinations_are_refused_before_any_work(tmp_path, capsys):
    config = write_config(tmp_path / "train.yaml")
    with unwritable_folder(tmp_path) as folder:
        result = _train(capsys, config, folder / "run")
        assert_one_line_error(result, "train", str(folder / "run"), rc=2)
        assert list(folder.iterdir()) == []
    (tmp_path / "file").write_text("a file, not a folder")
    result = _train(capsys, config, tmp_path / "file" / "run")
    assert_one_line_error(result, "train", "file", "not a folder", rc=2)


def test_a_folder_holding_a_run_is_never_reused(reference, tmp_path, capsys):
    config, run = reference
    before = snapshot(run)
    assert_one_line_error(_train(capsys, config, run), "train", str(run), "--resume", rc=2)
    assert snapshot(run) == before
    # a run killed before its first checkpoint holds only its config and log: still claimed
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(run / "train_config.json", killed)
    before = snapshot(killed)
    assert_one_line_error(_train(capsys, config, killed), "train", str(killed), rc=2)
    assert snapshot(killed) == before


@pytest.fixture
def finished_run(reference, tmp_path):
    config, run = reference
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    return config, copy


@pytest.mark.parametrize("flags, changed", [
    (["--seed", "5"], ["seed: run 0, now 5", "--override seed"]),
    (["--batch-size", "2"], ["batch_size: run 4, now 2"]),
])
def test_resume_refuses_changed_options(finished_run, capsys, flags, changed):
    config, run = finished_run
    before = snapshot(run)
    result = _train(capsys, config, run, "--resume", *flags)
    assert_one_line_error(result, "train", str(run), *changed, rc=2)
    assert snapshot(run) == before


def test_resume_refuses_a_changed_step_count(finished_run, tmp_path, capsys):
    config, run = finished_run
    from tests.faults.tools import TINY_RUN

    longer = [dict(stage) for stage in TINY_RUN["stages"]]
    longer[1]["steps"] = 5
    before = snapshot(run)
    result = _train(capsys, write_config(tmp_path / "longer.yaml", stages=longer), run, "--resume")
    assert_one_line_error(result, "train", "stages[1].steps: run 3, now 5", "--override stages", rc=2)
    assert snapshot(run) == before


def test_an_override_is_accepted_and_recorded(finished_run, capsys):
    config, run = finished_run
    result = _train(capsys, config, run, "--resume", "--seed", "5", "--override", "seed")
    assert result.rc == 0, result.err
    record = json.loads((run / "overrides.json").read_text())
    assert record == [{"global_step": 6, "changed": {"seed": {"from": 0, "to": 5}}}]
    assert json.loads((run / "train_config.json").read_text())["seed"] == 5


def test_override_mistakes_are_named(finished_run, capsys):
    config, run = finished_run
    before = snapshot(run)
    assert_one_line_error(_train(capsys, config, run, "--resume", "--override", "seeds"), "train", "seeds", rc=2)
    assert_one_line_error(_train(capsys, config, run, "--override", "seed"), "train", "--override", rc=2)
    assert snapshot(run) == before


def test_validation_uses_a_val_split_when_the_dataset_has_one(monkeypatch):
    from dasam3 import data
    from dasam3.commands.train import _datasets
    from dasam3.data import synthetic
    from dasam3.training import TrainConfig

    monkeypatch.setitem(synthetic.SYNTHETIC_SPLITS, "val", 2)  # a third, disjoint seed stream
    config = TrainConfig(dataset="synthetic", stages=[STAGE])
    train, val, _ = _datasets(config, channels=1, image_size=16)
    assert val is not None and set(val.case_ids).isdisjoint(train.case_ids)
    assert val.case_ids == [case.case_id for case in data.synthetic_cases("val")] and val.augment is None


def test_held_out_cases_leave_the_training_set(capsys):
    from dasam3.commands.train import _datasets
    from dasam3.data import synthetic_cases
    from dasam3.training import TrainConfig

    config = TrainConfig(dataset="synthetic", stages=[STAGE], val_cases=1)
    train, val, _ = _datasets(config, channels=1, image_size=16)
    everything = [case.case_id for case in synthetic_cases("train")]
    assert train.case_ids == everything[:-1] and val.case_ids == everything[-1:]
    assert train.augment is not None and val.augment is None
    assert train.preprocessing is not None and train.preprocessing.dataset == "synthetic"
    config = TrainConfig(dataset="synthetic", stages=[STAGE])
    assert _datasets(config, channels=1, image_size=16)[1] is None
    assert "no validation" in capsys.readouterr().err

"""The one uninterrupted tiny training run the train cases compare with or start from."""

import pytest

from tests.faults.tools import run_cli, write_config


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """(config file, run folder) of a complete `dasam3 train` run (subprocess, as a user runs it)."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root / "train.yaml")
    result = run_cli("train", "--config", config, "--out", root / "run", "--no-eval")
    assert result.rc == 0, result.err
    return config, root / "run"

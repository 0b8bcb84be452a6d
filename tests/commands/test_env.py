"""`dasam3 env`: the versions and backends a bug report needs, checked against the libraries themselves."""

from __future__ import annotations

import json

import torch

from dasam3.cli import main
from dasam3_kernels import available_backends, load_backend


def test_env_reports_versions_hardware_and_backends(tmp_path, capsys):
    out = tmp_path / "env.json"
    assert main(["env", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["torch_cuda"] == torch.version.cuda
    assert report["cpu"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["gpu"]["available"] == torch.cuda.is_available()
    backends = report["backends"]
    for name in available_backends("cpu"):
        assert backends[name]["available"] and "cpu" in backends[name]["runs_on"], name
    for name, entry in backends.items():
        if name != "auto" and not entry["available"]:  # says what is missing, as load_backend does
            try:
                load_backend(name)
            except RuntimeError as error:
                assert entry["why"] == str(error)
    assert backends["auto"]["cpu float32"] in available_backends("cpu")
    assert "torch:" in capsys.readouterr().out


def test_env_refuses_to_overwrite(tmp_path):
    out = tmp_path / "env.json"
    out.write_text("mine")
    assert main(["env", "--json", str(out)]) == 2
    assert out.read_text() == "mine"

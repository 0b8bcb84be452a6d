"""benchmarks/gpu_check.py keeps every result: one failing contender is recorded and the others go on,
and the JSON on disk holds each contender as soon as it is measured."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_a_failing_contender_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    seen_on_disk = []

    def fake_contenders(args, activation, x, grad_out):
        def fails():
            raise RuntimeError("CUDA error: an illegal memory access")

        def measured(name):
            def run():
                if out.exists():  # what the JSON held when this contender started
                    seen_on_disk.append(sorted(json.loads(out.read_text())["results"][activation]["layers"]))
                return {"eager": {"forward_ms": 1.0, "train_step_ms": 2.0}}
            return run

        return {("layers", "dense"): measured("dense"), ("layers", "triton"): fails,
                ("layers", "torch"): measured("torch"), ("ops", "torch"): measured("op")}

    monkeypatch.setattr(gpu_check, "contenders", fake_contenders)
    rc = gpu_check.main(["--device", "cpu", "--tokens", "8", "--d-model", "8", "--d-ff", "16", "--activations",
                         "relu", "--out", str(out)])
    assert rc == 1  # a contender failed, and says so
    layers = json.loads(out.read_text())["results"]["relu"]["layers"]
    assert layers["triton"] == {"error": "RuntimeError: CUDA error: an illegal memory access"}
    assert layers["torch"]["eager"]["forward_ms"] == 1.0
    assert seen_on_disk[:2] == [["dense", "triton"], ["dense", "torch", "triton"]]


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "bench.json"
    out.write_text("mine")
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 2
    assert out.read_text() == "mine"

"""`dasam3 train` on SAM3's towers from a local `save_pretrained` folder, at toy width: the path that
benchmarks/sam3_train_e2e.py runs on the full-size model (train with cached features, SIGKILL after
the first checkpoint, --resume, predict)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers (extra `sam3`) is not installed")

from dasam3.adapters import read_adapter  # noqa: E402
from dasam3.cli import main  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "sam3_train_e2e.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("sam3_train_e2e", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_on_a_local_sam3_folder_killed_resumed_and_predicting(tmp_path):
    bench = _benchmark()
    result = bench.run(tmp_path, toy=True, measure_cache=False)
    total = bench.TOY["warmup_steps"] + bench.TOY["calibrate_steps"]
    assert 2 <= result["train"]["killed_after_checkpoint_step"] < total  # killed mid-run ...
    assert result["train"]["final_step"] == total  # ... and resumed to the end
    assert result["predict"]["shape"] == [bench.TOY["image_size"], bench.TOY["image_size"], 3]
    last = tmp_path / "run" / "checkpoints" / "last"
    config = json.loads((last / "config.json").read_text())
    assert config["image_encoder_options"]["pretrained"] == str(tmp_path / "sam3")
    assert config["image_encoder_options"]["image_size"] == bench.TOY["sam3_image_size"]
    from safetensors import safe_open

    with safe_open(str(last / "model.safetensors"), "pt") as saved:  # the towers are referenced, not copied
        assert not any(k.startswith(("image_encoder.", "text_encoder.")) for k in saved.keys())
    straight = tmp_path / "straight"  # an uninterrupted run of the same config ends with the same adapter
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--out", str(straight), "--no-eval"]) == 0
    resumed, _ = read_adapter(last / "adapter.safetensors")
    expected, _ = read_adapter(straight / "checkpoints" / "last" / "adapter.safetensors")
    assert set(resumed) == set(expected) and resumed
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)

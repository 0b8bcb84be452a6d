"""`dasam3 demo --quick`, `dasam3 ablate --quick` and `dasam3 train` end to end, and the demo's
checkpoint through `dasam3 predict`."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from dasam3.cli import main

nib = pytest.importorskip("nibabel")


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    summary_path = out.parent / "summary.json"
    assert main(["demo", "--quick", "--out", str(out), "--json", str(summary_path)]) == 0
    return out, json.loads(summary_path.read_text())


def test_demo_writes_its_numbers_checkpoint_and_figures(demo_out):
    out, summary = demo_out
    assert {"mean_dice", "baseline_mean_dice", "per_concept", "seconds"} <= summary.keys()
    assert set(summary["per_concept"]) == {"gray matter", "white matter"}
    for row in summary["per_concept"].values():
        assert 0.0 <= row["dice"] <= 1.0 and row["hd95"] >= 0.0
    assert summary["mean_dice"] == pytest.approx(np.mean([r["dice"] for r in summary["per_concept"].values()]))
    assert [v["variant"] for v in summary["variants"]] == ["frozen", "lora", "da-sam3"]
    assert (summary["protocol"], summary["hd95_unit"]) == ("mm", "mm")  # MNI152's default protocol
    for name in ("config.json", "model.safetensors", "adapter.safetensors"):
        assert (out / "checkpoint" / name).is_file()
    record = json.loads((out / "checkpoint" / "preprocessing.json").read_text())
    assert record == {"dataset": "mni152", "modality": "mri", "ct_window": None, "plane": "axial",
                      "image_size": 64, "channels": 1, "source": None}
    for name in ("overlay.png", "routing.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = (out / "results.md").read_text()
    assert "| da-sam3 |" in results and "Protocol: `mm`" in results


def test_demo_refuses_to_overwrite_without_the_flag(demo_out):
    out, _ = demo_out
    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        main(["demo", "--quick", "--out", str(out)])


def test_demo_checkpoint_segments_a_nifti_with_predict(demo_out, tmp_path, capsys):
    from dasam3.data.mni152 import mni152_volume
    from dasam3.models import DASAM3

    out, _ = demo_out
    volume, _ = mni152_volume()
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    image = nib.Nifti1Image(np.transpose(volume.image, (2, 1, 0))[:, ::-1, :].copy(), affine)
    image.set_data_dtype(np.float32)
    source = tmp_path / "t1.nii.gz"
    nib.save(image, source)
    target = tmp_path / "labels.nii.gz"
    assert main(["predict", "-i", str(source), "-o", str(target), "--checkpoint", str(out / "checkpoint")]) == 0
    assert "warning" not in capsys.readouterr().err  # the checkpoint says how it was trained
    assert json.loads((tmp_path / "labels.json").read_text())["modality"] == "mri"
    written = nib.load(target)
    assert written.shape == image.shape and np.allclose(written.affine, affine)
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels > 0).any()
    model = DASAM3.from_pretrained(out / "checkpoint")
    assert model.config.concepts == ["gray matter", "white matter"]


def test_ablate_quick_runs_every_table2_variant_and_the_fair_lora_rows(tmp_path, capsys):
    from dasam3.layers.context import ConceptConcat

    out = tmp_path / "ablation"
    assert main(["ablate", "--quick", "--out", str(out), "--warmup-steps", "3", "--calibrate-steps", "1",
                 "--pretrain-steps", "3", "--protocol", "transunet"]) == 0
    rows = list(csv.DictReader(io.StringIO((out / "ablation.csv").read_text())))
    assert [r["variant"] for r in rows] == ["frozen", "concat", "lora", "lora-matched", "lora-concept",
                                            "standard-moe", "wo-der", "wo-dpe", "da-sam3"]
    assert {r["protocol"] for r in rows} == {"transunet"} and "mean_hd95_voxel" in rows[0]
    trainable = {r["variant"]: int(r["trainable_params"]) for r in rows}
    # matched to within one rank step (2 · 3 layers · (d_model + d_ff) = 1,920 parameters per rank)
    assert abs(trainable["lora-matched"] - trainable["da-sam3"]) <= 1920 // 2
    # LoRA's parameters plus Concat's Linear([h ; e_c]) at the 3 hierarchical layers (d_model 64, MiniLM's 384)
    projections = 3 * sum(p.numel() for p in ConceptConcat(64, 384).parameters())
    assert trainable["lora-concept"] == trainable["lora"] + projections
    assert all(float(r["seconds"]) > 0 for r in rows)
    table = (out / "ablation.md").read_text()
    assert "| lora-matched | 19" in table and "Protocol: `transunet`" in table and "Total:" in table
    assert "| lora-concept |" in capsys.readouterr().out


def test_train_command_from_yaml_resumes_and_scores(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        "dataset: synthetic\nimage_size: 32\nbatch_size: 3\nval_every: 100\ncheckpoint_every: 2\n"
        "stages:\n  - {kind: warmup, steps: 3, variant: da-sam3, variant_options: {num_experts: 2, rank: 2}}\n"
        "  - {kind: calibrate, steps: 2}\n"
        "model: {image_size: 32, image_encoder_options: {widths: [4, 8, 8]}, d_model: 16, num_layers: 2,\n"
        "        num_heads: 2, d_ff: 32, mask_dim: 4, text_encoder_options: {dim: 16}}\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--protocol", "transunet"]) == 0
    assert (out / "checkpoints" / "last" / "adapter.safetensors").is_file()
    assert json.loads((out / "evaluation.json").read_text())["protocol"] == "transunet"
    assert (out / "train_config.json").is_file()
    record = json.loads((out / "checkpoints" / "last" / "preprocessing.json").read_text())
    assert (record["dataset"], record["image_size"], record["modality"]) == ("synthetic", 32, None)
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--out", str(out), "--resume"]) == 0
    assert main(["train", "--out", str(tmp_path / "other"), "--dataset", "synthetic"]) == 2
    assert "dasam3 train: error: give the model" in capsys.readouterr().err

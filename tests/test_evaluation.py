"""Volume inference with any segmenter, 3-D scoring against medpy, aggregation, tables."""

import csv
import io
import json
import math

import numpy as np
import pytest
import torch

from dasam3.data import Volume
from dasam3.evaluation import (EvaluationResult, comparison_table, dataset_table, evaluate_volumes,
                               predict_volume, score_volume)

medpy_binary = pytest.importorskip("medpy.metric.binary")


def _label_volume(depth=6, size=16):
    """A label volume and an image that encodes it (label / 2), with organ-like blobs."""
    d, y, x = np.indices((depth, size, size))
    label = np.zeros((depth, size, size), np.int64)
    label[((y - 5) ** 2 + (x - 5) ** 2 < 12) & (d > 0)] = 1
    label[(y > 9) & (y < 14) & (x > 7) & (x < 14) & (d < depth - 1)] = 2
    return label, (label / 2).astype(np.float32)


def _decode(images):
    """A perfect segmenter for `_label_volume`'s images."""
    return torch.round(images[:, 0] * 2).long()


def test_predict_volume_at_native_size_is_exact():
    label, image = _label_volume()
    seen = []

    def segmenter(images):
        seen.append(tuple(images.shape))
        return _decode(images)

    predicted = predict_volume(image, segmenter, image_size=16, channels=3, batch_size=4)
    np.testing.assert_array_equal(predicted, label)
    assert seen == [(4, 3, 16, 16), (2, 3, 16, 16)]


def test_predict_volume_resizes_labels_back_by_nearest():
    """The model's 8×8 labels come back to 16×16 as 2×2 blocks (np.kron is the oracle)."""
    rng = np.random.default_rng(0)
    model_labels = torch.from_numpy(rng.integers(0, 3, (5, 8, 8)))
    calls = iter(range(5))

    def segmenter(images):
        assert images.shape == (1, 1, 8, 8)
        return model_labels[next(calls)][None]

    predicted = predict_volume(np.zeros((5, 16, 16), np.float32), segmenter, image_size=8, batch_size=1)
    np.testing.assert_array_equal(predicted, np.kron(model_labels.numpy(), np.ones((1, 2, 2), int)))


def test_predict_volume_rejects_a_wrong_segmenter_output():
    with pytest.raises(ValueError, match=r"segmenter must return labels \[2, 8, 8\], got \[2, 1, 8, 8\]"):
        predict_volume(np.zeros((2, 8, 8), np.float32), lambda x: x.long(), image_size=8)


def test_score_volume_matches_medpy_in_mm_and_transunet_rules():
    gt, _ = _label_volume()
    pred = gt.copy()
    pred[2:4] = np.roll(pred[2:4], 2, axis=2)  # shift part of the organs
    pred[pred == 2] = 0  # class 2 missed entirely
    spacing = (2.5, 0.7, 0.9)
    names = {1: "liver", 2: "spleen", 3: "absent"}
    mm = {s.name: s for s in score_volume(pred, gt, names, case_id="c", spacing=spacing)}
    assert mm["liver"].dice == pytest.approx(medpy_binary.dc(pred == 1, gt == 1), abs=1e-6)
    assert mm["liver"].hd95 == pytest.approx(
        medpy_binary.hd95(pred == 1, gt == 1, voxelspacing=spacing), abs=1e-6)
    diagonal = math.sqrt((5 * 2.5) ** 2 + (15 * 0.7) ** 2 + (15 * 0.9) ** 2)
    assert (mm["spleen"].dice, mm["spleen"].hd95) == (0.0, pytest.approx(diagonal))
    assert math.isnan(mm["absent"].dice) and math.isnan(mm["absent"].hd95)

    voxel = {s.name: s for s in score_volume(pred, gt, names, case_id="c", spacing=spacing,
                                             protocol="transunet")}
    assert voxel["liver"].hd95 == pytest.approx(medpy_binary.hd95(pred == 1, gt == 1), abs=1e-6)
    assert (voxel["spleen"].dice, voxel["spleen"].hd95) == (0.0, 0.0)
    assert (voxel["absent"].dice, voxel["absent"].hd95) == (0.0, 0.0)
    with pytest.raises(ValueError, match="protocol must be one of.*'nnunet'"):
        score_volume(pred, gt, names, case_id="c", protocol="nnunet")


def test_evaluate_volumes_with_a_perfect_segmenter():
    volumes = []
    for number in range(2):
        label, image = _label_volume(depth=4 + number)
        volumes.append(Volume(image, label, (2.0, 1.0, 1.0), f"case{number}"))
    result = evaluate_volumes(volumes, _decode, ["disc", "box"], image_size=16)
    assert result.case_ids == ["case0", "case1"]
    assert result.mean() == {"dice": 1.0, "hd95": 0.0}
    assert [s.dice for s in result.scores] == [1.0] * 4


def _result(protocol="mm"):
    from dasam3.evaluation import ClassScore

    scores = [ClassScore("a", 1, "liver", 0.9, 4.0), ClassScore("a", 2, "spleen", 0.5, 10.0),
              ClassScore("b", 1, "liver", 0.7, 6.0), ClassScore("b", 2, "spleen", math.nan, math.nan)]
    return EvaluationResult(scores, {1: "liver", 2: "spleen"}, protocol)


def test_aggregation_is_mean_over_cases_then_classes():
    result = _result()
    per_class = result.per_class()
    assert per_class["liver"] == {"dice": pytest.approx(0.8), "hd95": pytest.approx(5.0), "cases": 2}
    assert per_class["spleen"] == {"dice": 0.5, "hd95": 10.0, "cases": 1}  # nan (absent) left out
    assert result.mean() == {"dice": pytest.approx(0.65), "hd95": pytest.approx(7.5)}


def test_json_csv_and_markdown(tmp_path):
    result = _result()
    document = json.loads(result.to_json())
    assert document["mean"]["dice"] == pytest.approx(0.65) and document["hd95_unit"] == "mm"
    assert document["cases"][3] == {"case_id": "b", "label": 2, "name": "spleen", "dice": None,
                                    "hd95": None}
    rows = list(csv.DictReader(io.StringIO(result.classes_csv())))
    assert [r["class"] for r in rows] == ["liver", "spleen", "mean"]
    assert float(rows[2]["dice"]) == pytest.approx(0.65)
    assert len(list(csv.DictReader(io.StringIO(result.cases_csv())))) == 4
    table = comparison_table({"ours": result, "baseline": _result()})
    assert table.splitlines()[0] == ("| Method | DSC ↑ | HD95 ↓ (mm) | liver (DSC / HD95) | "
                                     "spleen (DSC / HD95) |")
    assert table.splitlines()[2] == "| ours | 65.00 | 7.50 | 80.00 / 5.00 | 50.00 / 10.00 |"
    assert table.splitlines()[-1].startswith("Protocol: `mm` (strict empty-mask rule")
    assert table.splitlines()[-1].endswith("HD95 in mm; means over cases per class, then over classes.")
    wide = dataset_table({"ours": {"Synapse": result, "ACDC": result}, "baseline": {"ACDC": result}})
    assert wide.splitlines()[0] == ("| Method | Synapse DSC ↑ | Synapse HD95 ↓ | ACDC DSC ↑ | "
                                    "ACDC HD95 ↓ |")
    assert wide.splitlines()[3] == "| baseline | – | – | 65.00 | 7.50 |"
    assert [line.split(":")[0] for line in wide.splitlines()[-2:]] == ["Synapse", "ACDC"]

    written = result.write(tmp_path, method="ours")
    assert sorted(p.name for p in written) == sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileExistsError, match="evaluation.json"):
        result.write(tmp_path)
    result.write(tmp_path, overwrite=True)


def test_tables_name_the_protocol_and_refuse_to_mix_them():
    table = comparison_table({"ours": _result("transunet")}, trainable={"ours": 194828})
    assert table.splitlines()[0].startswith("| Method | trainable params | DSC ↑ | HD95 ↓ (voxels) |")
    assert table.splitlines()[2].startswith("| ours | 194,828 | 65.00 |")
    assert "Protocol: `transunet` (TransUNet/SAMed's calculate_metric_percase" in table
    assert json.loads(_result("transunet").to_json())["hd95_unit"] == "voxel"
    with pytest.raises(ValueError, match="baseline: protocol 'transunet' differs from 'mm'"):
        comparison_table({"ours": _result(), "baseline": _result("transunet")})


def test_synapse_columns_follow_transunets_table_order():
    """Whatever the label ids, Synapse's organs print as TransUNet's Table 1 does."""
    from dasam3.data.synapse import SYNAPSE_CLASSES
    from dasam3.evaluation import ClassScore

    names = dict(enumerate(SYNAPSE_CLASSES, start=1))
    scores = [ClassScore("c", label, name, label / 10, float(label)) for label, name in names.items()]
    header = comparison_table({"m": EvaluationResult(scores, names, "transunet")}).splitlines()[0]
    columns = [cell.split(" (")[0] for cell in header.strip("| ").split(" | ")[3:]]
    assert columns == ["aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen",
                       "stomach"]
    row = comparison_table({"m": EvaluationResult(scores, names, "transunet")}).splitlines()[2]
    assert row.split(" | ")[3] == "70.00 / 7.00"  # aorta is label 7 in SAMed's ids


def test_volumes_without_physical_spacing_report_hd95_in_voxels():
    label, image = _label_volume()
    unknown = Volume(image, label, (1.0, 1.0, 1.0), "h5", spacing_unit="voxel")
    result = evaluate_volumes([unknown], _decode, ["disc", "box"], image_size=16, protocol="mm")
    assert result.hd95_unit == "voxel" and json.loads(result.to_json())["hd95_unit"] == "voxel"
    assert "HD95 ↓ (voxels)" in result.to_markdown()
    physical = Volume(image, label, (2.0, 1.0, 1.0), "nifti")
    assert evaluate_volumes([physical], _decode, ["disc", "box"], image_size=16).hd95_unit == "mm"
    with pytest.raises(ValueError, match="cannot be scored together"):
        evaluate_volumes([unknown, physical], _decode, ["disc", "box"], image_size=16)

"""`dasam3 bench` (dasam3/commands/bench.py, dasam3/benchmark.py): bf16 mixed precision on the CPU,
the hardware named, thread scaling, and the check of the choice "auto" makes against the timings."""

from __future__ import annotations

import json

import pytest
import torch

from dasam3 import benchmark
from dasam3.cli import main
from dasam3_kernels import available_backends


def test_bench_bf16_autocast_names_hardware_and_scales_threads(tmp_path, capsys):
    out = tmp_path / "bench.json"
    backends = [b for b in ("cpu", "torch") if b in available_backends("cpu")]
    assert main(["bench", "--dtype", "bf16", "--threads", "1", "2", "--batch", "1", "--tokens", "24", "--d-model",
                 "16", "--d-ff", "32", "--backends", *backends, "--min-time", "0", "--clock", "cpu",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert result["precision"] == "fp32 modules under torch.autocast('cpu', torch.bfloat16)"
    assert result["hardware"] and result["hardware"] in printed
    assert "ATen " + torch.backends.cpu.get_cpu_capability() in result["isa"] and result["isa"] in printed
    assert [run["threads"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        names = [row["name"] for row in run["rows"]]
        assert names == ["dense FFN", *(f"DAMoE {b}" for b in backends), "standard MoE (full experts)"]
        for row in run["rows"][1:-1]:  # the DAMoE layers, checked against the fp32 reference
            assert 0 <= row["max_rel_error_vs_reference"] <= 2e-2, row
        assert set(run["fastest"].values()) <= set(backends)
    assert result["auto_picks"] in backends and f"auto picks {result['auto_picks']!r}" in printed
    assert result["clock"] == "cpu" and len(result["load_average"]) == 3


def _rows(forward: dict[str, float], train: dict[str, float]) -> list[dict]:
    return [{"name": name, "forward_ms": forward[name], "train_step_ms": train[name]} for name in forward]


def test_fastest_ignores_the_reference_and_the_dense_ffn():
    rows = _rows({"dense FFN": 1.0, "DAMoE reference": 2.0, "DAMoE cpu": 5.0, "DAMoE torch": 4.0},
                 {"dense FFN": 1.0, "DAMoE reference": 2.0, "DAMoE cpu": 3.0, "DAMoE torch": 4.0})
    assert benchmark.fastest_damoe_backends(rows) == {"forward": "torch", "train_step": "cpu"}


@pytest.mark.parametrize("auto, verdict", [("cpu", "SLOWER than the fastest measured in: forward;"),
                                           ("torch", "SLOWER than the fastest measured in: train step;")])
def testauto_line_flags_a_slower_choice(auto: str, verdict: str):
    line = benchmark.auto_line(auto, {"forward": "torch", "train_step": "cpu"})
    assert verdict in line and "fastest: forward torch, train step cpu" in line


def testauto_line_confirms_the_fastest():
    assert "(the fastest measured;" in benchmark.auto_line("cpu", {"forward": "cpu", "train_step": "cpu"})


@pytest.mark.parametrize("clock", sorted(benchmark.CLOCKS))
def test_interleaved_medians_time_each_function_in_turn(clock: str):
    calls: list[str] = []
    medians = benchmark.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                            min_run_time=0.0, min_repeats=3, clock=clock)
    assert calls == ["a", "b"] * 4  # one warm-up each, then three rounds
    assert set(medians) == {"a", "b"} and all(ms >= 0 for ms in medians.values())


@pytest.mark.skipif(benchmark.minor_page_faults() is None, reason="this OS counts no page faults")
def test_interleaved_times_count_each_calls_page_faults():
    """A call that touches fresh memory (64 MiB: glibc maps it anew and unmaps it on free) faults every
    time; one that allocates nothing does not."""
    faults: dict[str, list[int]] = {}
    benchmark.interleaved_times({"touch": lambda: bytearray(64 << 20), "idle": lambda: None}, min_run_time=0.0,
                                min_repeats=3, faults=faults)
    assert [len(faults[name]) for name in ("touch", "idle")] == [3, 3]
    assert min(faults["touch"]) > max(faults["idle"])
    row = {"forward_page_faults": 2024.0, "train_step_page_faults": 11234.0}
    assert benchmark.page_faults_text(row) == "2024 / 11234"
    assert benchmark.page_faults_text({}) == ""


def test_paired_ratios_pair_each_round_with_its_baseline():
    # Load drifts between rounds: the contender took twice the baseline's time in two rounds of three,
    # which the ratio of the medians (2 / 10) misses and the median of the per-round ratios finds.
    times = {"dense": [1.0, 10.0, 10.0], "other": [2.0, 2.0, 20.0]}
    ratios = benchmark.paired_ratios(times, "dense")
    assert ratios["dense"] == 1.0
    assert ratios["other"] == pytest.approx(2.0)

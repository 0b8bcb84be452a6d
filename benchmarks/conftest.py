"""`pytest benchmarks/ --benchmark` runs the benchmarks; without the flag they are skipped.

After the run, a table of each contender's median relative to the dense FFN is printed, headed by the
hardware (the CPU model, and the instruction set the dasam3 kernels were built for).
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks in benchmarks/ (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run with `pytest benchmarks/ --benchmark`")
    for item in items:
        item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", {})[bench.param or bench.name] = bench.stats.median
    from dasam3.benchmark import hardware_name, isa_description

    device = "cuda" if torch.cuda.is_available() else "cpu"
    terminalreporter.section("median relative to the dense FFN")
    hardware = f"{hardware_name(device)}; {isa_description(device) or 'GPU'}; torch {torch.__version__}"
    terminalreporter.write_line(hardware)
    for group, medians in sorted(groups.items()):
        dense = medians.get("dense FFN")
        if dense is None:
            continue
        for name, median in medians.items():
            terminalreporter.write_line(f"{group:<12} {name:<32} {median * 1e3:9.1f} ms  {median / dense:6.2f}x")

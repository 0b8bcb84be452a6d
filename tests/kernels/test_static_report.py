"""The GPU kernels of the plain and the gated layer compiled for sm_80 and sm_90 with no GPU (`dasam3
kernels --subset ci`), held to their resource budget: no fp16/bf16 config may spill, miss the tensor
cores or need more shared memory than the arch has.  Triton's real compiler runs in a subprocess (the test session's
TRITON_INTERPRET=1 would make it interpret); a couple of minutes on 2 cores, less with a warm cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from dasam3_kernels.static_report import ARCHS, Entry, budget_violations  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ROLES = {"router", "up_projection", "down_projection[fc2]", "router_backward", "backward", "down_projection[dx]"}
# A gated layer's launches that differ from the plain layer's (the backward: two passes, see triton_backward).
GATED_ROLES = {"up_projection": 1, "backward": 2, "down_projection[dx]": 1}


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> list[Entry]:
    out = tmp_path_factory.mktemp("kernels") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    result = subprocess.run([sys.executable, "-m", "dasam3", "kernels", "--arch", *ARCHS, "--subset", "ci",
                             "--json", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return [Entry(**e) for e in json.loads(out.read_text())]


def _autotune_configs() -> dict[str, int]:
    from dasam3_kernels import triton_backward, triton_down_proj, triton_up_proj

    down = len(triton_down_proj._GPU_CONFIGS)
    return {"up_projection": len(triton_up_proj._GPU_CONFIGS), "backward": len(triton_backward._GPU_CONFIGS),
            "down_projection[fc2]": down, "down_projection[dx]": down, "router": 1, "router_backward": 1}


def test_every_kernel_of_a_training_step_in_every_bf16_config(entries):
    configs = _autotune_configs()
    for arch in ARCHS:
        bf16 = [e for e in entries if e.arch == arch and e.dtype == "bf16" and e.source == "triton"]
        plain = {role: sum(e.kernel == role and not e.flags.get("gated") for e in bf16) for role in ROLES}
        assert plain == configs, arch
        gated = {role: sum(e.kernel == role and e.flags.get("gated", False) for e in bf16) for role in GATED_ROLES}
        assert gated == {role: passes * configs[role] for role, passes in GATED_ROLES.items()}, arch
        assert {e.activation for e in bf16 if e.flags.get("gated") and e.activation} == {"silu"}
        assert {e.kernel for e in entries if e.arch == arch and e.dtype == "fp16"} == ROLES
        for e in entries:
            assert Path(e.cubin).stat().st_size > 0 and e.registers > 0


def test_fp16_bf16_kernels_fit_the_budget(entries):
    """Issue 11 item 2: the backward too (it spilled 1.0-1.7 KB per thread while it ran the frozen GEMMs)."""
    problems = budget_violations(entries)
    assert not problems, "\n".join(problems)


def test_grids_fit_the_gpu(entries):
    """The backward's token splits fill two waves of the arch's SMs and never start a third."""
    for e in entries:
        if e.kernel == "backward" and e.source == "triton":
            sms = ARCHS[e.arch][1]
            assert 2 * sms - 32 < e.programs <= 2 * sms, (e.arch, e.programs)


def test_cuda_extension_kernels_are_read_from_the_library(entries):
    from dasam3_kernels.static_report import cuda_library

    if cuda_library() is None:
        pytest.skip("the CUDA extension is not built (CI builds it)")
    for arch in ARCHS:
        cuda = {(e.kernel, e.dtype, bool(e.flags.get("gated")))
                for e in entries if e.arch == arch and e.source == "cuda"}
        assert {(f"cuda {kind}_kernel", "bf16", gated) for kind in ("forward", "backward")
                for gated in (False, True)} <= cuda, arch  # plain and gated (budget_violations checks them all)


def _entry(**changes) -> Entry:
    fields = {"kernel": "up_projection", "arch": "sm_90", "dtype": "bf16", "activation": "gelu", "config": {},
              "registers": 128, "spill_bytes": 0, "shared_bytes": 1024, "tensor_core_instructions": 8,
              "compile_s": 1.0, "cubin": "x.cubin", "shared_limit": ARCHS["sm_90"][2]}
    return Entry(**{**fields, **changes})


def test_the_budget_names_each_kind_of_breach():
    assert budget_violations([_entry(), _entry(dtype="fp32", spill_bytes=64)]) == []
    assert "spills (64 bytes" in budget_violations([_entry(spill_bytes=64)])[0]
    assert "no tensor-core instruction" in budget_violations([_entry(tensor_core_instructions=0)])[0]
    assert "shared memory > 232448" in budget_violations([_entry(shared_bytes=300_000)])[0]

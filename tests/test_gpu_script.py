"""benchmarks/gpu.sh: valid bash, and a clean no-op where no CUDA device is visible; and a
smoke run of benchmarks/scale.py, its last part."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"
SCALE = SCRIPT.parent / "scale.py"

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


@needs_bash
def test_syntax():
    out = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@needs_bash
def test_without_a_gpu_runs_nothing_and_exits_0(tmp_path):
    target = tmp_path / "gpu.json"
    out = run("--json", str(target), CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr
    assert "nothing run" in out.stdout
    assert "CUDA_VISIBLE_DEVICES hides every device" in out.stdout
    assert "==" not in out.stdout  # no part started
    assert not target.exists()


@needs_bash
def test_unknown_argument_exits_2():
    out = run("--bogus")
    assert out.returncode == 2
    assert "unknown argument --bogus" in out.stderr


@needs_bash
@pytest.mark.parametrize("args", [("--json",), ("--data",), ("--json", ""),
                                  ("--json", "--data", "x"), ("--data", "--json", "x")])
def test_an_option_without_its_value_exits_2(args):
    out = run(*args, CUDA_VISIBLE_DEVICES="")  # would otherwise exit 0 having run nothing
    assert out.returncode == 2, out.stderr
    assert f"{args[0]} needs a value" in out.stderr
    assert "unbound variable" not in out.stderr
    assert "nothing run" not in out.stdout


@needs_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the whole script")
def test_gpu_without_a_usable_torch_says_what_to_install(tmp_path):
    fake = tmp_path / "nvidia-smi"  # a GPU that no torch here can use
    fake.write_text("#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    out = subprocess.run(["bash", str(SCRIPT), "--json", str(tmp_path / "gpu.json")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert "a GPU is present" in out.stderr and "install a CUDA build of torch" in out.stderr
    assert not (tmp_path / "gpu.json").exists()


def _scale():
    spec = importlib.util.spec_from_file_location("scale_bench", SCALE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scale_fit_recovers_a_line_and_the_budget():
    rows = [{"section": "hypergrad", "cg_iterations": k, "r": 0.5 + 1.25 * k} for k in (1, 2, 5)]
    fit = _scale().fit(rows, "r")
    assert fit["fixed"] == pytest.approx(0.5, abs=1e-12)
    assert fit["per_iteration"] == pytest.approx(1.25, abs=1e-12)
    assert fit["max_k_within_target"] == 2  # 0.5 + 1.25 k <= 3


@pytest.mark.slow
def test_scale_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(SCALE), "--json", str(out), "--quick",
                          "--threads", "1", "--rounds", "1", "--cg", "1,3", "--cg-full", "1,3",
                          "--pretrain", "3", "--residual-k", "3", "--no-memory"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    records = json.loads(out.read_text())
    sections = {x["section"] for x in records}
    assert {"meta", "step", "parts", "hypergrad", "fit", "self_check", "residuals",
            "agreement", "targets"} <= sections
    hyper = {(x["config"], x["cg_iterations"]): x for x in records
             if x["section"] == "hypergrad"}
    assert sorted(hyper) == [("full", 1), ("full", 3), ("sub", 1), ("sub", 3)]
    # the timed solves use scale.py's --damping default (not passed here), d > 0
    dampings = {x["damping"] for x in hyper.values()}
    assert len(dampings) == 1
    d = dampings.pop()
    assert d > 0
    # residual curves: the sub-batch Hessian undamped and at d, the full batch at d
    curves = {(x["config"], x["damping"]): x["residuals"] for x in records
              if x["section"] == "residuals"}
    assert sorted(curves) == [("full", d), ("sub", 0.0), ("sub", d)]
    assert all(len(c) == 4 for c in curves.values())  # k = 0..3
    # the timed k = 3 runs and the residual curves at damping d are the same solves
    for config in ("full", "sub"):
        assert hyper[config, 3]["residual"] == pytest.approx(curves[config, d][3], rel=1e-4)
    # the sub-batch Hessian is a different operator: its residuals differ
    assert curves["sub", d][1] != pytest.approx(curves["full", d][1], rel=1e-3)
    agree = {(x["config"], x["cg_iterations"]): x for x in records
             if x["section"] == "agreement"}
    # the reference is the full-batch curve's solve at k = 3: the timed one agrees
    assert agree["full", 3]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert agree["full", 3]["relative_distance"] == pytest.approx(0.0, abs=1e-4)
    assert all(-1 - 1e-9 <= x["cosine"] <= 1 + 1e-9 for x in agree.values())
    assert {x["config"] for x in records if x["section"] == "fit"} == {"full", "sub"}

"""benchmarks/peers.py (slow smoke run) and its checker benchmarks/check_peers.py (fast)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _checker():
    spec = importlib.util.spec_from_file_location("check_peers", BENCH / "check_peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(name, value, target=1.0, agree=True, noise=0.05, **kw):
    return {"section": kw.pop("section", "ridge"), "name": name, "value": value,
            "target": target, "met": None if target is None else value <= target,
            "agree": agree, "rel_diff": 0.0 if agree else 1.0, "agree_tol": 1e-8,
            "noise": noise, **kw}


def _run(tmp_path, rows, *args):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"meta": {}, "results": rows}))
    return _checker().main([str(path), *args])


def test_checker_passes_met_and_within_noise(tmp_path):
    rows = [_row("met", 0.8, 0.9), _row("within noise", 0.93, 0.9, noise=0.05),
            _row("no target", 3.0, None)]
    assert _run(tmp_path, rows) == 0


def test_checker_fails_past_the_noise(tmp_path):
    assert _run(tmp_path, [_row("slow", 0.96, 0.9, noise=0.05)]) == 1
    # the row's own noise widens the band; --noise is only a floor
    assert _run(tmp_path, [_row("noisy", 0.96, 0.9, noise=0.10)]) == 0
    assert _run(tmp_path, [_row("slow", 0.96, 0.9, noise=0.0)], "--noise", "0.1") == 0
    assert _run(tmp_path, [_row("slow", 0.96, 0.9, noise=0.0)], "--noise", "0.0") == 1


def test_checker_gives_an_accuracy_no_noise(tmp_path):
    acc = _row("best rel. error", 1.02e-10, 1e-10, noise=0.0, metric="rel_error")
    assert _run(tmp_path, [acc]) == 1
    assert _run(tmp_path, [{**acc, "value": 9e-11}]) == 0


def test_checker_fails_a_disagreement_even_when_faster(tmp_path):
    assert _run(tmp_path, [_row("fast but wrong", 0.1, 0.9, agree=False)]) == 1
    assert _run(tmp_path, [_row("wrong, no target", 1.0, None, agree=False)]) == 1
    assert _run(tmp_path, [_row("fast but wrong", 0.1, 0.9, agree=False)],
                "--structure-only") == 1


def test_checker_structure(tmp_path):
    missing = {"section": "lvhba", "name": "lvhba", "available": False, "why": "no file"}
    crashed = {"section": "maml", "name": "maml", "available": False, "why": "boom",
               "error": True}
    ok = _row("x", 5.0, 0.9)  # far past its target
    assert _run(tmp_path, [ok], "--structure-only") == 0
    assert _run(tmp_path, [ok, missing], "--structure-only") == 0
    assert _run(tmp_path, [ok, missing], "--structure-only", "--strict") == 1
    assert _run(tmp_path, [ok, crashed], "--structure-only") == 1
    assert _run(tmp_path, [ok], "--structure-only", "--sections", "ridge") == 0
    assert _run(tmp_path, [ok], "--structure-only", "--sections", "ridge,maml") == 1
    assert _run(tmp_path, [ok, missing], "--structure-only", "--sections", "lvhba") == 1


def test_checker_unreadable(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    assert _checker().main([str(path)]) == 2
    path.write_text(json.dumps({"meta": {}}))
    assert _checker().main([str(path)]) == 1


@pytest.mark.slow
def test_peers_quick_run(tmp_path):
    out = tmp_path / "peers.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(BENCH / "peers.py"), "--quick", "--json", str(out)],
                   check=True, env=env, timeout=900)
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] == 1
    sections = {r["section"] for r in data["results"]}
    expected = {"ridge", "hvp_auto", "hvp_batched", "implicit_memory", "distill", "lvhba",
                "maml", "implicit_mlp"}
    assert sections == expected
    crashed = [r for r in data["results"] if r.get("error")]
    assert not crashed, crashed
    # the sections whose code is in the tree must have run (lvhba / distill_step are
    # optional modules of other tasks)
    for s in expected - {"lvhba", "distill"}:
        assert any(r.get("available", True) for r in data["results"] if r["section"] == s), s
    for r in data["results"]:
        if r.get("available", True):
            assert r["agree"] is not False, r
    check = subprocess.run([sys.executable, str(BENCH / "check_peers.py"), str(out),
                            "--structure-only", "--sections", ",".join(sorted(expected - {
                                "lvhba", "distill"}))], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout

"""benchmarks/peers.py (slow smoke run), its checker benchmarks/check_peers.py (fast), and the
argument checks of the benchmarks it draws on (distill_step.py, lvhba.py)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _row(name, value, target=1.0, agree=True, noise=0.05, **kw):
    return {"section": kw.pop("section", "ridge"), "name": name, "value": value,
            "target": target, "met": None if target is None else value <= target,
            "agree": agree, "rel_diff": 0.0 if agree else 1.0, "agree_tol": 1e-8,
            "noise": noise, **kw}


def _checker():
    return _load("check_peers")


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


def test_checker_fails_an_empty_or_all_skipped_result(tmp_path, capsys):
    assert _run(tmp_path, []) == 1
    assert "no results" in capsys.readouterr().out
    missing = {"section": "lvhba", "name": "lvhba", "available": False, "why": "no file"}
    assert _run(tmp_path, [missing]) == 1
    assert "every row was skipped" in capsys.readouterr().out
    assert _run(tmp_path, [missing, _row("met", 0.8, 0.9)]) == 0


def test_checker_caps_a_rows_own_noise(tmp_path):
    cap = _checker().NOISE_CAP
    assert cap == 0.25
    # a 4.5x regression with noise 9 (formerly within its band) fails
    assert _run(tmp_path, [_row("very noisy", 4.5, 1.0, noise=9.0)]) == 1
    # the cap itself still widens the band: just inside passes, just outside fails
    assert _run(tmp_path, [_row("inside", 1.0 + cap - 1e-3, 1.0, noise=9.0)]) == 0
    assert _run(tmp_path, [_row("outside", 1.0 + cap + 1e-3, 1.0, noise=9.0)]) == 1
    assert _run(tmp_path, [_row("inf noise", 1.0 + cap + 1e-3, 1.0, noise=math.inf)]) == 1
    # a NaN own noise gives no allowance of its own; --noise still applies
    assert _run(tmp_path, [_row("nan noise", 1.03, 1.0, noise=math.nan)]) == 0
    assert _run(tmp_path, [_row("nan noise", 1.06, 1.0, noise=math.nan)]) == 1
    # an accuracy's own noise is capped alike
    acc = _row("rel. error", 1.3e-10, 1e-10, noise=9.0, metric="rel_error")
    assert _run(tmp_path, [acc]) == 1


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_checker_fails_a_non_finite_value(tmp_path, value):
    assert _run(tmp_path, [_row("inf", value, 1.0, noise=math.inf)]) == 1
    assert _run(tmp_path, [_row("inf", value, 1.0, noise=0.0)], "--noise", "1e9") == 1


@pytest.mark.parametrize("bad, named", [
    (5, "row 1"), ("text", "row 1"), (None, "row 1"), ([1, 2], "row 1"),
    ({"section": "ridge", "name": "s", "value": "0.8", "target": 1.0}, "row 1 (ridge / s)"),
    ({"section": "ridge", "name": "t", "value": 0.8, "target": "1"}, "row 1 (ridge / t)"),
    ({"section": "ridge", "name": "n", "value": 0.8, "target": 1.0, "noise": "x"},
     "row 1 (ridge / n)"),
    ({"section": "ridge", "name": "b", "value": True, "target": 1.0}, "row 1 (ridge / b)"),
    ({"section": "ridge", "name": "i", "value": 0.8, "target": math.inf}, "row 1 (ridge / i)"),
])
def test_checker_a_malformed_row_exits_2_naming_it(tmp_path, capsys, bad, named):
    assert _run(tmp_path, [_row("fine", 0.8, 0.9), bad]) == 2
    err = capsys.readouterr().err
    assert named in err and "not a peers.py result" in err


DISTILL_STEP_COUNTS = ("--rounds", "--ipc", "--inner-steps", "--threads", "--width")
LVHBA_COUNTS = ("--iterations", "--rounds", "--round-iterations")


@pytest.mark.parametrize("script, option", [("distill_step", o) for o in DISTILL_STEP_COUNTS]
                         + [("lvhba", o) for o in LVHBA_COUNTS])
@pytest.mark.parametrize("text", ["0", "-3", "1.5", "x"])
def test_benchmark_counts_refuse_non_positive_integers(capsys, script, option, text):
    with pytest.raises(SystemExit) as e:
        _load(script).main([option, text])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err and ">= 1" in err and "Traceback" not in err


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("script, counts", [("distill_step", DISTILL_STEP_COUNTS),
                                            ("lvhba", LVHBA_COUNTS)])
def test_benchmark_counts_are_all_checked(monkeypatch, script, counts):
    """Every numeric option of the script is one of the counts tested above, typed
    positive_int."""
    mod = _load(script)
    seen = []

    def parse_args(self, args=None, namespace=None):
        seen.extend(self._actions)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    with pytest.raises(_Parsed):
        mod.main([])
    numeric = {a.option_strings[0]: a.type for a in seen
               if a.type in (int, float, mod.positive_int)}
    assert numeric == dict.fromkeys(counts, mod.positive_int)


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

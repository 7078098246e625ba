"""examples/curse_of_unrolling.py: the burn-in of the unrolled Jacobian, on its own data.

The example's functions run at a small size (d = 10, μ = 1, L = 40, 350 steps: GD peaks
predicted at t ≈ 80, 40, 20 and 100 (|1 − hL| = 0.99 for h = 1.99/L whatever L), Chebyshev
at ≈ 6), then the script itself runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "curse_of_unrolling.py"
MU, L, STEPS, DIM = 1.0, 40.0, 350, 10
GD = ["GD h=0.5/L", "GD h=1/L", "GD h=2/(L+μ)", "GD h=1.99/L"]


def _load():
    spec = importlib.util.spec_from_file_location("curse_of_unrolling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cu():
    return _load()


@pytest.fixture(scope="module")
def result(cu):
    return cu.run(steps=STEPS, dim=DIM, mu=MU, L=L)


def test_jacobian_error_rises_then_falls(result):
    for name, m in result["methods"].items():
        jac = m["jacobian_error"]
        peak = m["peak_observed"]
        assert jac[0] == pytest.approx(1.0)  # ∂x₀ = 0: the error starts at ‖∂x*‖
        # a real burn-in (observed ≥ 25×), strictly inside the run, then a real decay
        assert 0 < peak < STEPS and m["peak_height"] > 10 * jac[0], (name, peak, m["peak_height"])
        assert jac[-1] < 0.5 * m["peak_height"], (name, jac[-1], m["peak_height"])
        # it grows on the way up (rising over the first half of the burn-in)
        assert jac[max(1, peak // 2)] < jac[peak] and jac[1] < jac[max(1, peak // 2)], name


def test_peak_where_the_rate_predicts(result):
    """Observed peak within 1.5× of 1/(1 − ρ) (GD) or 2/(1 − ξ) (Chebyshev)."""
    for name in ["GD h=0.5/L", "GD h=1/L", "GD h=2/(L+μ)", "GD h=1.99/L", "Chebyshev"]:
        m = result["methods"][name]
        ratio = m["peak_observed"] / m["peak_predicted"]
        assert 1 / 1.5 < ratio < 1.5, (name, m["peak_observed"], m["peak_predicted"])
    # the two small steps, where the slowest mode λ = μ alone sets the peak: within 10%
    for name in ["GD h=0.5/L", "GD h=1/L"]:
        m = result["methods"][name]
        assert abs(m["peak_observed"] / m["peak_predicted"] - 1) < 0.1, (name, m)


def test_larger_steps_burn_in_longer_and_higher_past_the_iterate_optimum(result):
    """Past h = 2/(L+μ) (the best step for the iterate) the slowest mode is λ = L with
    |1 − hL| → 1 as h → 2/L: a larger step peaks later and higher. Below it the slowest
    mode is λ = μ, whose peak t ≈ 1/(hμ) comes *earlier* for larger h (same height)."""
    m = result["methods"]
    assert m["GD h=1.99/L"]["peak_observed"] > 1.5 * m["GD h=2/(L+μ)"]["peak_observed"]
    assert (m["GD h=0.5/L"]["peak_observed"] > m["GD h=1/L"]["peak_observed"]
            > m["GD h=2/(L+μ)"]["peak_observed"])
    heights = [m[name]["peak_height"] for name in GD]
    assert heights[3] > 1.3 * heights[2] > 1.3 * heights[1]
    assert heights[0] == pytest.approx(heights[1], rel=0.05)
    # the iterate: faster up to 2/(L+μ), at the end of the run
    final = [m[name]["iterate_error"][-1] for name in GD]
    assert final[0] > final[1] > final[2] and final[3] > final[2]
    assert m["Chebyshev"]["iterate_error"][60] < 1e-6 < min(v[60] for v in (
        m[name]["iterate_error"] for name in GD))


def test_closed_form_equals_library_curves(result):
    for name, m in result["methods"].items():
        # the vectors x_t and ∂x_t, relative to ‖x₀ − x*‖ and ‖∂x*‖, at every t
        assert m["max_dev_closed_form_x"] < 1e-8, name
        assert m["max_dev_closed_form_jac"] < 1e-8, name
        # the plotted error curves themselves, wherever they are above rounding
        for key in ("iterate_error", "jacobian_error"):
            lib = torch.tensor(m[key], dtype=torch.float64)
            closed = torch.tensor(m[key + "_closed_form"], dtype=torch.float64)
            seen = closed > 1e-6
            assert int(seen.sum()) > 20
            assert float(((lib - closed).abs() / closed)[seen].max()) < 1e-8, (name, key)


def test_unrolled_estimator_reproduces_the_curves(result):
    for name, m in result["methods"].items():
        assert len(m["unrolled_checks"]) >= 2, name
        for c in m["unrolled_checks"]:
            assert c["unrolled"] == pytest.approx(c["jvp"], rel=1e-10), (name, c)


def test_closed_form_alone_shows_the_curse(cu):
    """Independent of the library: as h → 2/L the peak of the L-mode moves out like
    1/(2 − hL) and grows without bound (the paper's arbitrarily long burn-in)."""
    quad = cu.make_quadratic(DIM, MU, L)
    peaks, heights = [], []
    for h in (1.9 / L, 1.99 / L, 1.999 / L):
        _, jacs, _, dx_star = cu.closed_form_curves(quad, cu.gd_polynomials(h), 3000)
        err = (jacs - dx_star).norm(dim=1) / dx_star.norm()
        peaks.append(int(err.argmax()))
        heights.append(float(err.max()))
    assert peaks[0] < peaks[1] < peaks[2] and heights[0] < heights[1] < heights[2]
    assert 0.67 * 1000 < peaks[2] < 1.5 * 1000, peaks


def test_bad_settings_are_refused(cu):
    with pytest.raises(ValueError, match="mu < L"):
        cu.make_quadratic(10, mu=2.0, L=1.0)
    with pytest.raises(ValueError, match="dim"):
        cu.make_quadratic(1)
    with pytest.raises(ValueError, match="steps"):
        cu.run(steps=1)
    with pytest.raises(ValueError, match="unknown method"):
        cu.run(steps=5, dim=4, names=["Adam"])


def test_script_writes_png_json_and_table(tmp_path):
    pytest.importorskip("matplotlib")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out, js = tmp_path / "out", tmp_path / "curves.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "100", "--dim", "10",
                           "--out", str(out), "--json", str(js)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "peak t obs" in proc.stdout and "Chebyshev" in proc.stdout
    assert (out / "curse_of_unrolling.png").stat().st_size > 20_000
    s = json.loads(js.read_text())
    assert s["steps"] == 100 and s["dim"] == 10 and len(s["methods"]) == 5
    cheb = s["methods"]["Chebyshev"]
    assert len(cheb["jacobian_error"]) == 101 and cheb["t_iterate"] is not None
    assert 5 < cheb["peak_observed"] < 15

"""Peak memory of reverse-mode unrolling, plain against recompute.

Each estimator runs in a fresh subprocess that reports the increase of its peak
resident memory (VmHWM, which a new process does not inherit, unlike ru_maxrss) over a
baseline taken after a warm-up, so allocations of one run cannot hide those of another.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import json, re, sys
    import torch
    import hypergrad as hg

    d, steps, recompute = 40_000, int(sys.argv[1]), sys.argv[2] == "1"
    g = torch.Generator().manual_seed(0)
    target = torch.randn(d, generator=g, dtype=torch.float64)

    def inner(p, h, _):  # elementwise: every step saves a few d-sized tensors
        r = p["w"] - target
        return torch.nn.functional.softplus(r).sum() + 0.5 * (h["lam"].exp() * r * r).sum()

    def outer(p, h, _):
        return 0.5 * (p["w"] ** 2).sum()

    problem = hg.Problem(inner, outer, optimizer=hg.SGD(lr=0.1), steps=steps)
    hp = {"lam": torch.zeros(d, dtype=torch.float64)}
    p0 = {"w": torch.zeros(d, dtype=torch.float64)}
    est = hg.Unrolled(recompute=recompute)
    est(hg.Problem(inner, outer, optimizer=hg.SGD(lr=0.1), steps=2), hp, p0)  # warm-up
    def hwm_kib():
        return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    base = hwm_kib()
    out = est(problem, hp, p0)
    peak = hwm_kib() - base
    print(json.dumps({"peak_mib": peak / 1024, "grad": out.grad["lam"][:5].tolist()}))
""")


def _run(steps: int, recompute: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(steps), str(int(recompute))],
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_recompute_uses_less_memory_and_gives_the_same_gradient():
    plain, recomputed = _run(100, False), _run(100, True)
    # the same steps replayed; only the backward's grouping differs (observed equal)
    assert torch.allclose(torch.tensor(plain["grad"]), torch.tensor(recomputed["grad"]),
                          rtol=1e-12, atol=0)
    # plain stores ~100 steps of d-sized tensors (~0.3 MiB each); recompute ~2·√100
    assert plain["peak_mib"] > 60
    assert recomputed["peak_mib"] < 0.35 * plain["peak_mib"], (plain, recomputed)

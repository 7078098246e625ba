"""The outer loop: equality with a hand-written loop, logs, checkpoints, kill-and-resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import bilevel
import hypergrad as hg
from bilevel import checkpoint as ckpt
from bilevel.outer import OuterLoop

from problems import DT, Ridge

TESTS = Path(__file__).resolve().parent


def _setup(steps: int = 40):
    r = Ridge.make()
    return r, r.problem(steps=steps)


def _val_loss(r: Ridge, lam: torch.Tensor) -> float:
    rr = Ridge(r.X, r.y, r.Xv, r.yv, lam.detach())
    w = rr.w_star()
    res = r.Xv @ w - r.yv
    return float(0.5 * res @ res / r.Xv.shape[0])


def test_matches_hand_written_loop_and_validation_loss_falls():
    r, problem = _setup()
    est = hg.Implicit()
    loop = OuterLoop(problem, r.hparams(), r.params0(), est,
                     lambda hp: torch.optim.Adam(hp, lr=0.1))
    history = loop.run(8)

    lam = r.hparams()["lam"].clone().requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=0.1)
    params, state = r.params0(), None
    for _ in range(8):
        res = est(problem, {"lam": lam.detach().clone()}, params, state)
        lam.grad = res.grad["lam"].clone()
        opt.step()
        opt.zero_grad()
        params, state = res.params, res.state
    assert torch.equal(loop.hparams["lam"].detach(), lam.detach())
    assert torch.equal(loop.params["w"], params["w"])
    assert [h["step"] for h in history] == list(range(8))
    assert _val_loss(r, loop.hparams["lam"]) < _val_loss(r, r.lam)
    assert history[-1]["outer_loss"] < history[0]["outer_loss"]


def test_user_optimizer_scheduler_clip_constraint_reinit():
    r, problem = _setup(steps=30)
    lam = r.hparams()["lam"].requires_grad_(True)
    opt = torch.optim.SGD([lam], lr=5.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    loop = OuterLoop(problem, {"lam": lam}, None, "implicit", opt, sched,
                     reinit=lambda t: (seen.append(t), r.params0())[1], clip_norm=0.01,
                     constraint={"lam": lambda t: t.clamp(-1.9, 0.4)})
    history = loop.run(4)
    assert seen == [0, 1, 2, 3]
    assert loop.hparams["lam"] is lam  # updated in place, the optimizer's own tensor
    lam = lam.detach()
    assert float(lam.min()) == -1.9 and float(lam.max()) == 0.4  # the ends start outside
    assert [h["lr"] for h in history] == [5.0, 5.0, 2.5, 2.5]
    # clipped steps: each SGD step moves λ by at most lr · clip_norm (inside the box)
    assert 0 < float((lam - r.lam)[1:-1].norm()) <= 0.01 * (5 + 5 + 2.5 + 2.5) + 1e-12


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoint files in a run folder (``step-XXXXXXXX-<run>.pt``)."""
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


def test_history_logs_eval_and_callbacks(tmp_path):
    r, problem = _setup(steps=30)
    events = []

    class CB(bilevel.Callback):
        def on_step(self, loop, record):
            events.append(("step", record["step"]))

        def on_eval(self, loop, record):
            events.append(("eval", record["step"]))

        def on_checkpoint(self, loop, path):
            events.append(("ckpt", loop.global_step))

        def on_end(self, loop):
            events.append(("end", loop.global_step))

    run = tmp_path / "run"
    loop = OuterLoop(problem, r.hparams(), r.params0(), "implicit",
                     lambda hp: torch.optim.Adam(hp, lr=0.1),
                     evaluate=lambda hp, p: {"val": _val_loss(r, hp["lam"])}, eval_every=2,
                     callbacks=[CB()], run_dir=run, checkpoint_every=2, keep_checkpoints=2)
    history = loop.run(4)
    keys = {"step", "outer_loss", "hypergrad_norm", "inner_grad_norm", "solve_residual",
            "solve_iterations", "seconds", "peak_memory_mib"}
    assert keys <= set(history[0])
    assert history[0]["peak_memory_mib"] > 0
    assert "eval_val" not in history[0] and "eval_val" in history[1]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(x["step"]) for x in rows] == [0, 1, 2, 3]
    assert rows[0]["eval_val"] == "" and float(rows[3]["eval_val"]) > 0
    assert events[:3] == [("step", 0), ("eval", 1), ("step", 1)]
    assert ("ckpt", 2) in events and ("ckpt", 4) in events and events[-1] == ("end", 4)
    assert checkpoint_steps(run) == [2, 4]

    class Stop(bilevel.Callback):
        def on_step(self, loop, record):
            if record["step"] >= 5:
                loop.stop()

    loop.callbacks.append(Stop())
    loop.run(100)
    assert loop.global_step == 6
    loop.close()


def test_bad_inputs_name_the_tensor():
    r, problem = _setup(steps=5)
    with pytest.raises(hg.HyperparameterError, match="dict"):
        OuterLoop(problem, [r.lam], r.params0())
    with pytest.raises(hg.HyperparameterError, match=r"hparams\['lam'\]"):
        OuterLoop(problem, {"lam": [1.0]}, r.params0())
    with pytest.raises(hg.BilevelInputError, match=r"params\['w'\].*float32"):
        OuterLoop(problem, r.hparams(), {"w": torch.zeros(8, dtype=torch.float32)})
    with pytest.raises(hg.BilevelInputError, match=r"hparams\['lam'\].*float32"):
        lam = r.lam.float().requires_grad_(True)
        OuterLoop(problem, {"lam": lam}, r.params0(), optimizer=torch.optim.SGD([lam]))
    with pytest.raises(hg.BilevelInputError, match=r"params\['w'\] is on meta"):
        OuterLoop(problem, r.hparams(), {"w": torch.zeros(8, dtype=DT, device="meta")})
    with pytest.raises(hg.HyperparameterError, match=r"hparams\['lam'\] is not a tensor held"):
        OuterLoop(problem, r.hparams(), r.params0(),
                  optimizer=torch.optim.SGD([torch.zeros(1, requires_grad=True)]))
    # the dtype setting casts hparams and params; the data then disagrees -> named
    loop = OuterLoop(problem, r.hparams(), r.params0(), dtype=torch.float32)
    assert loop.hparams["lam"].dtype == torch.float32
    with pytest.raises(hg.BilevelInputError, match="inner_batch"):
        loop.step()


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    r, problem = _setup(steps=40)
    run = tmp_path / "run"
    loop = OuterLoop(problem, r.hparams(), r.params0(), "implicit",
                     lambda hp: torch.optim.Adam(hp, lr=0.1), run_dir=run,
                     checkpoint_every=1)
    loop.run(2)
    good = loop.current_hparams()["lam"]
    # a crash after a temp file was written but before the rename
    (run / "checkpoints" / ".step-crashed.pt.x.tmp").write_bytes(b"partial garbage")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        loop.step()  # checkpoints step 3 and fails mid-write
    monkeypatch.undo()
    assert checkpoint_steps(run) == [1, 2]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")] == \
        [".step-crashed.pt.x.tmp"]  # the failed write cleaned up its own temp file
    loop.close()
    fresh = OuterLoop(problem, r.hparams(), r.params0(), "implicit",
                      lambda hp: torch.optim.Adam(hp, lr=0.1), run_dir=run)
    assert fresh.resume() == 2
    assert torch.equal(fresh.hparams["lam"].detach(), good)
    assert not list((run / "checkpoints").glob("*.tmp"))  # stale temps removed at open
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # step 2 not kept
    # an unreadable newest file of this run falls back to the previous one
    newest = sorted((run / "checkpoints").glob("step-*.pt"))[-1]
    newest.write_bytes(b"truncated")
    fresh.close()
    again = OuterLoop(problem, r.hparams(), r.params0(), "implicit",
                      lambda hp: torch.optim.Adam(hp, lr=0.1), run_dir=run)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert again.resume() == 1
    again.close()


def test_resume_in_process_equals_uninterrupted(tmp_path):
    r, problem = _setup(steps=20)

    def make(d):
        return OuterLoop(problem, r.hparams(), None, "random_window",
                         lambda hp: torch.optim.Adam(hp, lr=0.1),
                         lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9),
                         reinit=lambda t: {"w": 0.1 * torch.randn(8, dtype=DT)},
                         run_dir=d, checkpoint_every=1)

    torch.manual_seed(0)
    full = make(tmp_path / "a")
    full.run(5)
    torch.manual_seed(0)
    part = make(tmp_path / "b")
    part.run(3)
    part.close()
    torch.randn(100)  # disturb the RNG: resume must restore it
    again = make(tmp_path / "b")
    assert again.resume() == 3
    again.run(5)
    assert torch.equal(full.hparams["lam"].detach(), again.hparams["lam"].detach())
    assert [h["step"] for h in again.history] == list(range(5))
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 5


SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from problems import Ridge, DT
from bilevel.outer import OuterLoop

ckdir, total, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
r = Ridge.make()

class Marker:
    def on_checkpoint(self, loop, path):
        print("CKPT", loop.global_step, flush=True)
        time.sleep(slow)

loop = OuterLoop(r.problem(steps=20), r.hparams(), None, "random_window",
                 lambda hp: torch.optim.Adam(hp, lr=0.1),
                 lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.95),
                 reinit=lambda t: {{"w": 0.1 * torch.randn(8, dtype=DT)}},
                 run_dir=ckdir, checkpoint_every=1, callbacks=[Marker()])
print("RESUMED", loop.resume(), flush=True)
loop.run(total)
torch.save(loop.current_hparams(), ckdir + "/final.pt")
print("DONE", flush=True)
"""


def test_kill_and_resume_subprocess_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    total = 8

    def run(d, slow="0"):
        return subprocess.run([sys.executable, str(script), str(d), str(total), slow],
                              env=env, capture_output=True, text=True, timeout=120)

    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    # killed after step 3 was checkpointed
    d = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(d), str(total), "0.5"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    try:
        for line in proc.stdout:
            if line.startswith("CKPT") and int(line.split()[1]) >= 3:
                break
            assert time.monotonic() < deadline
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = checkpoint_steps(d)
    assert 3 <= max(done) < total and not (d / "final.pt").exists()
    resumed = run(d)
    assert resumed.returncode == 0, resumed.stderr
    assert f"RESUMED {max(done)}" in resumed.stdout
    a = torch.load(tmp_path / "ref" / "final.pt")
    b = torch.load(d / "final.pt")
    assert torch.equal(a["lam"], b["lam"])


def test_progress_printer(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # force the plain line printer
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    r, problem = _setup(steps=30)
    loop = OuterLoop(problem, r.hparams(), r.params0(), progress=True)
    loop.run(10)
    assert "outer step 10/10" in capsys.readouterr().err
    OuterLoop(problem, r.hparams(), r.params0()).run(1)  # non-TTY: silent by default
    assert capsys.readouterr().err == ""


def test_tensorboard_writes_every_metric(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r, problem = _setup(steps=30)
    loop = OuterLoop(problem, r.hparams(), r.params0(), "implicit",
                     lambda hp: torch.optim.Adam(hp, lr=0.1), tensorboard=tmp_path / "tb",
                     evaluate=lambda hp, p: {"val": _val_loss(r, hp["lam"])}, eval_every=2)
    history = loop.run(3)
    assert loop.sinks[-1]._writer is None  # closed at the end of run
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    numeric = {k for h in history for k, v in h.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert "outer_loss" in numeric and "eval_val" in numeric
    assert tags == numeric
    for k in ("outer_loss", "hypergrad_norm", "lr"):
        events = acc.Scalars(k)
        assert [e.step for e in events] == [0, 1, 2]
        assert [e.value for e in events] == pytest.approx([h[k] for h in history], rel=1e-6)
    assert [e.step for e in acc.Scalars("eval_val")] == [1]


def test_tensorboard_closed_on_exception(tmp_path, monkeypatch):
    """Runs without the tensorboard package: the writer class is replaced by a recorder."""
    import bilevel.sinks as sinks

    calls = []

    class Writer:
        def __init__(self, log_dir):
            calls.append(("open", log_dir))

        def add_scalar(self, tag, value, global_step):
            calls.append((tag, global_step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close", None))

    class Boom:
        def on_step(self, loop, record):
            if record["step"] == 1:
                raise RuntimeError("boom")

    monkeypatch.setattr(sinks, "summary_writer_class", lambda: Writer)
    r, problem = _setup(steps=10)
    loop = OuterLoop(problem, r.hparams(), r.params0(), "unrolled",
                     tensorboard=tmp_path / "tb", callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        loop.run(5)
    assert calls[0] == ("open", str(tmp_path / "tb")) and calls[-1] == ("close", None)
    assert ("outer_loss", 0) in calls and ("outer_loss", 1) in calls
    assert ("inner_steps", 0) in calls and ("step", 0) not in calls
    assert ("solve_residual", 0) not in calls  # None for unrolled: not a number
    assert loop.sinks[-1]._writer is None


def test_tensorboard_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    r, problem = _setup(steps=5)
    with pytest.raises(ImportError, match=r"pip install bilevel\[tensorboard\]"):
        OuterLoop(problem, r.hparams(), r.params0(), tensorboard="tb")
    OuterLoop(problem, r.hparams(), r.params0())  # without the option nothing is imported


def test_an_unmeasured_inner_grad_norm_is_recorded_as_null(tmp_path):
    """Unrolled(grad_norm=False) reports NaN; the records (and metrics.jsonl) hold null,
    a measured norm a number."""
    r, problem = _setup(steps=5)
    for grad_norm in (False, True):
        loop = OuterLoop(problem, r.hparams(), r.params0(), hg.Unrolled(grad_norm=grad_norm),
                         lambda hp: torch.optim.Adam(hp, lr=0.1),
                         run_dir=tmp_path / str(grad_norm))
        history = loop.run(2)
        loop.close()
        norms = [h["inner_grad_norm"] for h in history]
        rows = [json.loads(line) for line in
                (tmp_path / str(grad_norm) / "metrics.jsonl").read_text().splitlines()]
        if grad_norm:
            assert all(isinstance(n, float) and n > 0 for n in norms)
        else:
            assert norms == [None, None]
            assert [row["inner_grad_norm"] for row in rows] == [None, None]

"""Run folders under every entry point: careless and unlucky users lose no work.

Each case below was mishandled before the run folder existed (issue: "One outer loop under
every application, and run folders that never lose work"): overwritten runs, two writers,
duplicated metrics rows, stale formats, edited configs, typos, bad paths and counts. The
kill tests SIGKILL `bilevel run` and `bilevel distill` at 20 random points each (some during
checkpoint writes) and require the bit-identical result with every step logged once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bilevel
import hypergrad as hg
from bilevel.cli import main
from bilevel.outer import OuterLoop

from problems import Ridge

TIMING = {"seconds", "step_seconds", "peak_memory_mib"}

TINY = """\
dtype = "float32"

[model]
sizes = [8]

[data]
dataset = "iris"

[hyperparameters]
tune = ["log_lr", "log_wd"]

[inner]
steps = 10

[estimator]
name = "{estimator}"

[outer]
lr = 0.05
steps = {steps}
checkpoint_every = 1

[output]
dir = "{out}"
"""


def config(tmp_path: Path, out: Path, steps: int = 4, estimator: str = "unrolled",
           name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(steps=steps, out=out.as_posix(), estimator=estimator))
    return path


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]


def ridge_loop(run_dir: Path | None = None, **kw) -> OuterLoop:
    r = Ridge.make()
    return OuterLoop(r.problem(steps=30), r.hparams(), r.params0(), "implicit",
                     lambda hp: torch.optim.Adam(hp, lr=0.1), run_dir=run_dir, **kw)


# --- the outer loop's arguments ----------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"checkpoint_every": -2}, "checkpoint_every must be an int >= 0"),
    ({"eval_every": -1}, "eval_every must be an int >= 0"),
    ({"eval_every": 2}, "eval_every > 0 needs evaluate"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be an int >= 1"),
    ({"checkpoint_every": 2, "run_dir": None}, "checkpoint_every needs a run_dir"),
    ({"run_mode": "maybe"}, "run_mode must be one of"),
    ({"clip_norm": -1.0}, "clip_norm must be a positive number"),
    ({"callbacks": [object()]}, "has none of the hooks"),
])
def test_bad_loop_arguments_are_refused_at_construction(tmp_path, kw, match):
    kw = {"run_dir": tmp_path / "run", **kw}
    with pytest.raises(hg.BilevelInputError if "hooks" not in match else TypeError,
                       match=match):
        ridge_loop(**kw)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_run_with_a_negative_count_and_unusable_optimizers():
    loop = ridge_loop()
    with pytest.raises(hg.BilevelInputError, match="num_steps must be an int >= 0"):
        loop.run(-5)
    r = Ridge.make()
    for opt, match in ((lambda hp: torch.optim.LBFGS(hp), "LBFGS needs a closure"),
                       (lambda hp: torch.optim.SparseAdam(hp), "SparseAdam needs sparse")):
        with pytest.raises(hg.BilevelInputError, match=match):
            OuterLoop(r.problem(steps=5), r.hparams(), r.params0(), optimizer=opt)
    with pytest.raises(hg.BilevelInputError, match="needs a hypergrad.ConstrainedProblem"):
        OuterLoop(r.problem(steps=5), r.hparams(), r.params0(), "kkt")


# --- one folder, one set of rules ------------------------------------------------------


def test_resume_without_checkpoint_logs_each_step_once(tmp_path):
    run = tmp_path / "run"
    loop = ridge_loop(run)
    loop.run(2)  # no checkpoint_every: the only checkpoint is at the end
    loop.close()
    (next((run / "checkpoints").glob("step-*.pt"))).unlink()  # as if killed before it
    again = ridge_loop(run)
    assert again.resume() == 0
    again.run(4)
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3]


def test_a_mistyped_checkpoint_path_is_an_error(tmp_path):
    run = tmp_path / "run"
    loop = ridge_loop(run, checkpoint_every=1)
    loop.run(3)
    with pytest.raises(bilevel.RunFolderError, match="step-0000003.pt"):
        loop.resume(run / "checkpoints" / "step-0000003.pt")  # one digit short
    assert loop.global_step == 3


def test_a_changed_setup_is_not_resumed_silently(tmp_path):
    run = tmp_path / "run"
    with ridge_loop(run, checkpoint_every=1) as loop:
        loop.run(2)
    r = Ridge.make()
    with pytest.raises(bilevel.ConfigMismatchError, match="optimizer"):
        OuterLoop(r.problem(steps=30), r.hparams(), r.params0(), "implicit",
                  lambda hp: torch.optim.Adam(hp, lr=0.5), run_dir=run)
    with pytest.raises(bilevel.ConfigMismatchError, match="estimator"):
        OuterLoop(r.problem(steps=30), r.hparams(), r.params0(), "unrolled",
                  lambda hp: torch.optim.Adam(hp, lr=0.1), run_dir=run)


def test_paths_are_checked_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for bad in (blocker, blocker / "below"):
        with pytest.raises(bilevel.RunFolderError, match=str(blocker.name)):
            ridge_loop(bad)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the folder goes")
    with pytest.raises(bilevel.RunFolderError, match="checkpoints"):
        ridge_loop(tmp_path / "run")


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with ridge_loop(tmp_path / "run", checkpoint_every=1) as loop:
            loop.run(1)
        d = bilevel.distill.Distiller(bilevel.data.load_digits(), tiny())
        d.run(run_dir=tmp_path / "d")
        bilevel.distill.write_outputs(tmp_path / "d", d, fake_report(d))
        d.close()
    finally:
        os.umask(old)
    files = list((tmp_path / "run" / "checkpoints").glob("*.pt")) + \
        [tmp_path / "d" / "distilled.pt", tmp_path / "d" / "summary.json",
         tmp_path / "run" / "metrics.jsonl"]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o644"}


def tiny(**kw) -> bilevel.distill.DistillConfig:
    base = dict(ipc=1, hidden=(8,), inner_steps=3, outer_steps=2, outer_batch=32)
    return bilevel.distill.DistillConfig(**{**base, **kw})


def fake_report(d):
    from bilevel.distill.evaluate import EvalResult
    from bilevel.distill.report import Report

    return Report(EvalResult((0.5, 0.6)), EvalResult((0.4, 0.5)), 0.9, "test")


# --- the command lines ----------------------------------------------------------------


def test_cli_refuses_what_it_cannot_do(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["run", str(tmp_path)], "is a directory"),
        (["run", str(config(tmp_path, out)), "--stop-after", "-2"], "expected an integer >= 0"),
        (["distill", "--threads", "-1", "--out", str(out)], "expected an integer >= 1"),
        (["distill", "--hidden", "0", "--out", str(out)], "expected an integer >= 1"),
        (["run", str(config(tmp_path, out, estimator="lvhba", name="l.toml"))],
         "constrained lower level"),
        (["run", str(config(tmp_path, out, estimator="kkt", name="k.toml"))],
         "constrained lower level"),
        (["run", str(config(tmp_path, out, estimator="soba", name="s.toml"))],
         "single-loop estimator"),
    ]
    for argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own refusal, also status 2
            code = exc.code
        assert code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_without_cuda_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    path = config(tmp_path, out)
    path.write_text('device = "cuda"\n' + path.read_text())
    assert main(["run", str(path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert main(["distill", "--device", "cuda", "--out", str(out)]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not out.exists()


def test_cli_run_refuses_another_runs_results(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("hparams.pt", "summary.json", "config.toml"):
        (out / name).write_text("another run's result")
    assert main(["run", str(config(tmp_path, out))]) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "another run's result"


def test_cli_resume_refuses_an_edited_config(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(config(tmp_path, out, steps=4)), "--stop-after", "2"]) == 0
    text = (out / "config.toml").read_text()
    (out / "config.toml").write_text(text.replace("sizes = [8]", "sizes = [16]"))
    assert main(["resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.sizes" in err and "[8]" in err and "[16]" in err
    (out / "config.toml").write_text(text.replace("steps = 4", "steps = 5"))  # longer: fine
    assert main(["resume", str(out)]) == 0
    assert [r["step"] for r in rows(out)] == [0, 1, 2, 3, 4]


def test_distill_refuses_a_folder_holding_another_run(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["distill", "--ipc", "1", "--inner-steps", "3", "--outer-steps", "2", "--hidden",
            "8", "--eval-nets", "1", "--out", str(out), "--no-progress"]
    assert main(base) == 0
    before = (out / "summary.json").read_text()
    assert main(base + ["--seed", "1"]) == 2
    assert "already holds another run" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == before
    blocker = tmp_path / "file"
    blocker.write_text("x")
    start = time.perf_counter()
    assert main(base[:-3] + ["--out", str(blocker / "out"), "--no-progress"]) == 2
    assert time.perf_counter() - start < 10  # refused before distilling
    assert "file" in capsys.readouterr().err


# --- two writers, and kills at random points -------------------------------------------

RUNNER = """
import os, sys, time
import bilevel.checkpoint as ck
_replace = os.replace
def slow_replace(src, dst):  # a checkpoint write takes long enough to be killed in
    if str(dst).endswith(".pt"):
        time.sleep(float(os.environ.get("SLOW_WRITE", "0")))
    _replace(src, dst)
ck.os.replace = slow_replace
import torch
torch.set_num_threads(1)
from bilevel.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(tmp_path: Path, *argv: str, slow: float = 0.0) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "SLOW_WRITE": str(slow), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_two_writers_on_one_folder(tmp_path):
    out = tmp_path / "out"
    path = config(tmp_path, out, steps=30)
    first = launch(tmp_path, "run", str(path), slow=0.4)  # about 12 s: others come meanwhile
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists():  # the first holds the folder
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    code, err = finish(launch(tmp_path, "run", str(path), "--overwrite"))
    assert code == 2 and "in use by" in err and f"pid {first.pid}" in err, err
    code, err = finish(launch(tmp_path, "resume", str(out)))
    assert code == 2 and "in use by" in err, err
    assert first.poll() is None  # the refusals came while it ran
    assert finish(first)[0] == 0
    assert [r["step"] for r in rows(out)] == list(range(30))
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


def kill_until_done(tmp_path: Path, start_argv: list[str], resume_argv: list[str], out: Path,
                    kills: int, seed: int) -> None:
    """Run, SIGKILL at a random moment after some progress (or during a slowed checkpoint
    write), resume, ... ``kills`` times; then resume to the end."""
    rng = random.Random(seed)
    for _ in range(kills):
        started = (out / "run.json").exists()
        proc = launch(tmp_path, *(resume_argv if started else start_argv), slow=0.3)
        seen = len(rows(out)) if (out / "metrics.jsonl").exists() else 0
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            now = len(rows(out)) if (out / "metrics.jsonl").exists() else 0
            if now > seen:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    code, err = finish(launch(tmp_path, *resume_argv))
    assert code == 0, err


def same_rows(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == list(range(len(a)))  # every step exactly once
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in a] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in b]


def test_kill_bilevel_run_at_20_points(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    steps = 12
    code, err = finish(launch(tmp_path, "run", str(config(tmp_path, ref, steps, name="a.toml"))))
    assert code == 0, err
    path = config(tmp_path, out, steps, name="b.toml")
    kill_until_done(tmp_path, ["run", str(path)], ["resume", str(out)], out, kills=20, seed=0)
    same_rows(rows(out), rows(ref))
    a, b = torch.load(ref / "hparams.pt"), torch.load(out / "hparams.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_bilevel_distill_at_20_points(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["distill", "--ipc", "1", "--inner-steps", "4", "--outer-steps", "16", "--hidden",
            "16", "--eval-nets", "1", "--eval-every", "5", "--checkpoint-every", "1",
            "--no-progress"]
    code, err = finish(launch(tmp_path, *args, "--out", str(ref)))
    assert code == 0, err
    kill_until_done(tmp_path, [*args, "--out", str(out)], [*args, "--out", str(out),
                                                           "--resume"], out, kills=20, seed=1)
    same_rows(rows(out), rows(ref))
    a = bilevel.distill.load_distilled(ref)
    b = bilevel.distill.load_distilled(out)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.lr == b.lr


# --- found by trying to break it --------------------------------------------------------


def test_distill_resume_keeps_checkpointing(tmp_path):
    out = tmp_path / "out"
    args = ["distill", "--ipc", "1", "--inner-steps", "3", "--hidden", "8", "--eval-nets",
            "1", "--checkpoint-every", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--outer-steps", "4"]) == 0
    assert main([*args, "--outer-steps", "8", "--resume"]) == 0  # continues 4 → 8
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("*.pt"))
    assert steps == [6, 8]  # checkpoints every 2 steps after the resume too (keep 2)
    assert [r["step"] for r in rows(out)] == list(range(8))


def test_run_from_a_config_inside_its_own_folder(tmp_path):
    out = tmp_path / "exp1"
    out.mkdir()
    path = config(tmp_path, out, steps=3)
    inside = out / "config.toml"
    inside.write_text(path.read_text())
    assert main(["run", str(inside), "-o", str(out), "--stop-after", "1"]) == 0
    assert main(["run", str(inside), "-o", str(out), "--overwrite"]) == 0
    assert inside.read_text() == path.read_text()
    assert [r["step"] for r in rows(out)] == [0, 1, 2]


def test_reopening_the_same_run_continues_it(tmp_path):
    run = tmp_path / "run"
    with ridge_loop(run, checkpoint_every=2) as loop:
        loop.run(6)
    with ridge_loop(run, checkpoint_every=2) as again:  # resume() not called by hand
        again.run(8)
        assert again.global_step == 8
    assert [r["step"] for r in rows(run)] == list(range(8))
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("*.pt"))
    assert steps[-1] == 8 and 6 in steps


def test_going_back_to_an_earlier_checkpoint_drops_the_later_ones(tmp_path):
    run = tmp_path / "run"
    with ridge_loop(run, checkpoint_every=2, keep_checkpoints=None) as loop:
        loop.run(8)
        early = next((run / "checkpoints").glob("step-00000004-*.pt"))
    with ridge_loop(run, keep_checkpoints=None) as loop:
        assert loop.resume(early) == 4
    with ridge_loop(run, keep_checkpoints=None) as loop:
        assert loop.resume() == 4  # not the abandoned step 8
        loop.run(6)
    assert [r["step"] for r in rows(run)] == list(range(6))


def test_unreadable_checkpoints_stop_a_resume_and_keep_the_logs(tmp_path):
    run = tmp_path / "run"
    with ridge_loop(run, checkpoint_every=1) as loop:
        loop.run(3)
    for f in (run / "checkpoints").glob("*.pt"):
        f.write_bytes(b"garbage")
    with ridge_loop(run) as loop, pytest.warns(RuntimeWarning, match="unreadable"), \
            pytest.raises(bilevel.RunFolderError, match="none of this run's checkpoints"):
        loop.resume()
    assert [r["step"] for r in rows(run)] == [0, 1, 2]


def test_write_outputs_respects_the_lock_and_other_runs(tmp_path):
    d = bilevel.distill.Distiller(bilevel.data.load_digits(), tiny())
    d.run()
    with ridge_loop(tmp_path / "held"):  # another run holds this folder
        with pytest.raises(bilevel.RunLockedError):
            bilevel.distill.write_outputs(tmp_path / "held", d, fake_report(d))
    with pytest.raises(bilevel.RunFolderError, match="'outer_loop' run"):
        bilevel.distill.write_outputs(tmp_path / "held", d, fake_report(d))
    paths = bilevel.distill.write_outputs(tmp_path / "new", d, fake_report(d))
    assert [r["step"] for r in rows(tmp_path / "new")] == [0, 1]
    assert paths["summary"].is_file()
    bilevel.distill.write_outputs(tmp_path / "new", d, fake_report(d))  # the same run: fine
    assert [r["step"] for r in rows(tmp_path / "new")] == [0, 1]


def test_a_closed_loop_writes_nothing_into_the_folder(tmp_path):
    run = tmp_path / "run"
    loop = ridge_loop(run)
    loop.run(2)
    loop.close()
    with ridge_loop(run) as other:
        assert other.resume() == 2
        loop.run(4)  # steps on, outside the folder
        assert [r["step"] for r in rows(run)] == [0, 1]


def test_user_sinks_live_across_runs_and_odd_counts(tmp_path):
    class ListSink:
        def __init__(self):
            self.records, self.closed = [], False

        def write(self, record):
            assert not self.closed
            self.records.append(record["step"])

        def close(self):
            self.closed = True

    sink = ListSink()
    loop = ridge_loop(sinks=[sink])
    loop.run(2)
    loop.run(np.int64(4))  # "until 4 in total", with a numpy count
    assert sink.records == [0, 1, 2, 3] and not sink.closed
    loop.close()
    assert sink.closed
    for bad in ("", Path("/")):
        with pytest.raises(bilevel.RunFolderError):
            ridge_loop(bad)
    with pytest.raises(hg.BilevelInputError, match="device"):
        ridge_loop(device="foo")


def test_device_and_seed_are_checked_by_the_command_lines(tmp_path, capsys):
    out = tmp_path / "out"
    for argv in (["distill", "--device", "foo", "--out", str(out)],
                 ["distill", "--device", "meta", "--out", str(out)],
                 ["distill", "--seed", "99999999999999999999999", "--out", str(out)]):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert "device" in err or "seed" in err, err
    path = config(tmp_path, out)
    path.write_text('device = "meta"\n' + path.read_text())
    assert main(["run", str(path)]) == 2
    assert "device: expected 'cpu' or 'cuda[:N]'" in capsys.readouterr().err
    assert not out.exists()


def test_the_demo_script_refuses_another_kind_of_run(tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(config(tmp_path, out, steps=2))]) == 0
    script = Path(__file__).parents[1] / "examples" / "distill.py"
    r = subprocess.run([sys.executable, str(script), "--ipc", "1", "--outer-steps", "1",
                        "--inner-steps", "2", "--eval-nets", "1", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "'run' run" in r.stderr, r.stderr
    assert (out / "hparams.pt").is_file()  # the other run is intact

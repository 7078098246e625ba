"""``bilevel tune`` on real storages with real worker processes: four workers sharing one
study on a journal file and on PostgreSQL, and workers killed with SIGKILL in the middle
of their trials, whose trials are failed by the heartbeat and re-run from their last
checkpoint by the remaining workers.

PostgreSQL: ``BILEVEL_TEST_POSTGRES_URL`` names a server to use; otherwise the fixture
starts a throwaway cluster on loopback from the server binaries (``initdb``, ``pg_ctl``:
``apt-get install postgresql``, which ``.ci/run`` does) and removes it afterwards. The
PostgreSQL tests skip, saying why, only where no server binaries or driver are installed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

import bilevel.tune.worker as worker

ROOT = Path(__file__).resolve().parents[1]
TS = optuna.trial.TrialState
SEARCH = """
[search]
"outer.lr" = { float = [1e-3, 1e-1], log = true }
"inner.steps" = { int = [2, 4] }
"""


def config(tmp_path: Path, outer_steps: int, inner_steps: int = 3,
           search: str = SEARCH) -> Path:
    """The digits MLP example, shortened, checkpointing every outer step."""
    text = (ROOT / "examples" / "configs" / "digits_mlp.toml").read_text()
    for old, new in [("steps = 60", f"steps = {inner_steps}"),
                     ("steps = 20", f"steps = {outer_steps}"),
                     ("checkpoint_every = 5", "checkpoint_every = 1")]:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "cfg.toml"
    path.write_text(text + search)
    return path


def start_worker(path: Path, out: Path, study: str, storage: str, *args: str
                 ) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "bilevel", "tune", str(path), "--threads", "1", "--out",
         str(out), "--study", study, "--storage", storage, "--pruner", "none", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out.parent, env=env,
        # a suite started in the background (`cmd &`) ignores SIGINT, and Python keeps an
        # ignored SIGINT ignored: give the worker the default, as in a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        errs.append(err)
    return errs


def check_complete(study: optuna.Study, out: Path, n: int) -> None:
    """``n`` trials, numbered 0..n-1, each complete in its own folder with its results."""
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(n))
    assert all(t.state == TS.COMPLETE for t in trials), [t.state for t in trials]
    assert len({t.user_attrs["run_dir"] for t in trials}) == n
    for t in trials:
        folder = Path(t.user_attrs["run_dir"])
        assert folder == (out / study.study_name / f"trial-{t.number}").resolve()
        assert json.loads((folder / "summary.json").read_text())["complete"]


# -- PostgreSQL ---------------------------------------------------------------------------

def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL URL: ``BILEVEL_TEST_POSTGRES_URL``, or a throwaway cluster on loopback
    (run as the ``postgres`` user when the tests run as root, as PostgreSQL requires)."""
    pytest.importorskip("psycopg2", reason="no PostgreSQL driver: pip install bilevel[postgres]")
    if os.environ.get("BILEVEL_TEST_POSTGRES_URL"):
        yield os.environ["BILEVEL_TEST_POSTGRES_URL"]
        return
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install "
                    "postgresql, or set BILEVEL_TEST_POSTGRES_URL")
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        runuser = shutil.which("runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            runuser = None
        if runuser is None:
            pytest.skip("running as root without a postgres user to start the server as")
        run_as = [runuser, "-u", "postgres", "--"]
        base = Path(tempfile.mkdtemp(prefix="bilevel-pg-"))  # pytest's tmp is root-only
        shutil.chown(base, "postgres")
    else:
        base = tmp_path_factory.mktemp("pg")
    data, log = base / "data", base / "log"
    port = _free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-U", "bilevel", "-A", "trust",
                    "--no-sync"], check=True, capture_output=True)
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w",
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://bilevel@127.0.0.1:{port}/postgres"  # the form the docs give
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        if run_as:
            shutil.rmtree(base, ignore_errors=True)


def storage_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A fresh storage of ``kind``: a journal file, an SQLite file or the PostgreSQL
    server (a study name per test keeps its studies apart)."""
    return {"journal": f"journal:{tmp_path / 'tune.log'}",
            "sqlite": f"sqlite:///{tmp_path / 'tune.db'}"}.get(kind) or \
        request.getfixturevalue("postgres_url")


# -- four workers, no failures ------------------------------------------------------------

@pytest.mark.parametrize("kind", ["journal", "postgres"])
def test_four_workers_share_one_study(kind: str, tmp_path: Path,
                                      request: pytest.FixtureRequest) -> None:
    storage = storage_url(kind, tmp_path, request)
    study_name = f"four-{kind}-{tmp_path.name}"
    path, out = config(tmp_path, outer_steps=2), tmp_path / "out"
    finish([start_worker(path, out, study_name, storage, "--n-trials", "2")
            for _ in range(4)])
    study = optuna.load_study(study_name=study_name, storage=worker.storage(storage))
    check_complete(study, out, 8)
    assert len({t.user_attrs["worker"] for t in study.get_trials()}) == 4


# -- workers killed in the middle of their trials -----------------------------------------

def _kill_two(procs: list[subprocess.Popen], storage: str, study_name: str,
              deadline: float = 240) -> list[int]:
    """Wait until two workers each run a trial with a checkpoint, SIGKILL them; returns
    the numbers of their trials."""
    pids = {p.pid: p for p in procs}
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            study = optuna.load_study(study_name=study_name,
                                      storage=worker.storage(storage, 0))
        except KeyError:  # not created yet
            time.sleep(0.2)
            continue
        ready = {}
        for t in study.get_trials(deepcopy=False, states=(TS.RUNNING,)):
            pid = int(str(t.user_attrs.get("worker", ":0")).rsplit(":", 1)[1])
            run_dir = t.user_attrs.get("run_dir")
            if pid in pids and run_dir and list(Path(run_dir).glob("checkpoints/step-*")):
                ready[pid] = t.number
        if len(ready) >= 2:
            chosen = sorted(ready)[:2]
            for pid in chosen:
                os.kill(pid, signal.SIGKILL)
                pids[pid].wait(timeout=30)
            return [ready[pid] for pid in chosen]
        time.sleep(0.2)
    raise AssertionError("no two workers reached a checkpoint in time")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_killed_workers_trials_rerun_from_checkpoint(kind: str, tmp_path: Path,
                                                     request: pytest.FixtureRequest) -> None:
    storage = storage_url(kind, tmp_path, request)
    study_name = f"kill-{kind}-{tmp_path.name}"
    path, out = config(tmp_path, outer_steps=40), tmp_path / "out"
    args = ("--heartbeat", "1")
    procs = [start_worker(path, out, study_name, storage, "--n-trials", "1", *args)
             for _ in range(4)]
    killed = _kill_two(procs, storage, study_name)
    survivors = [p for p in procs if p.returncode is None]
    assert len(survivors) == 2
    errs = finish(survivors)
    time.sleep(2.5)  # past the grace period (2 heartbeats): a late worker finds the rest
    errs += finish([start_worker(path, out, study_name, storage, "--n-trials", "0", *args)])

    study = optuna.load_study(study_name=study_name, storage=worker.storage(storage, 0))
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TS.FAIL]
    assert sorted(t.number for t in failed) == sorted(killed)  # detected by the heartbeat
    reruns = {worker.retry_of(t): t for t in trials if worker.retry_of(t) is not None}
    assert sorted(reruns) == sorted(killed)  # each re-run exactly once
    for number in killed:
        dead, again = next(t for t in failed if t.number == number), reruns[number]
        assert again.state == TS.COMPLETE
        assert again.params == dead.params
        assert again.user_attrs["run_dir"] == dead.user_attrs["run_dir"]
        assert again.user_attrs["resumed_step"] >= 1  # from the checkpoint, not step 0
        folder = Path(again.user_attrs["run_dir"])
        assert folder.name == f"trial-{number}"
        steps = [json.loads(line)["step"] for line in
                 (folder / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(40))  # every outer step logged once
        assert json.loads((folder / "summary.json").read_text())["complete"]
        curve = again.user_attrs["curve_eval_val_loss"]
        assert curve[0][0] <= again.user_attrs["resumed_step"]  # the replayed part too
        assert any(f"re-run of trial {number}" in e for e in errs)
    # every trial accounted for: the four new ones complete or failed-and-re-run
    new = [t for t in trials if worker.retry_of(t) is None]
    assert len(new) == 4
    assert all(t.state == TS.COMPLETE or t.number in killed for t in new)
    assert len(trials) == 6 and not [t for t in trials if t.state in (TS.RUNNING, TS.WAITING)]


def test_ctrl_c_ends_the_worker_with_a_resumable_folder(tmp_path: Path) -> None:
    """SIGINT mid-trial: exit status 130, one line saying which trial and how to continue
    its folder (whose checkpoint ``bilevel resume`` takes up)."""
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    # outer steps of 300 inner steps: the trial outlasts the signal's way to it (with 3
    # inner steps it could finish between its first checkpoint and the signal)
    path = config(tmp_path, outer_steps=40, inner_steps=300,
                  search='[search]\n"outer.lr" = { float = [1e-3, 1e-1], log = true }\n')
    out = tmp_path / "out"
    proc = start_worker(path, out, "int", storage, "--n-trials", "1")
    folder = out / "int" / "trial-0"
    end = time.monotonic() + 240
    while not list(folder.glob("checkpoints/step-*")) and time.monotonic() < end:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"bilevel: interrupted: trial 0 is marked failed; continue its folder with "
        f"`bilevel resume {folder.resolve()}`")
    assert "Traceback" not in err
    (trial,) = optuna.load_study(study_name="int", storage=storage).trials
    assert trial.state == TS.FAIL
    done = subprocess.run([sys.executable, "-m", "bilevel", "resume", str(folder),
                           "--threads", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stderr and "at outer step 0" not in done.stderr
    assert json.loads((folder / "summary.json").read_text())["complete"]

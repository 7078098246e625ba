"""bilevel.run_folder: lock, modes, checkpoints, metrics of one run folder."""

from __future__ import annotations

import gc
import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bilevel import checkpoint as ckpt
from bilevel.run_folder import (
    FORMAT,
    ConfigMismatchError,
    MetricsLog,
    RunFolder,
    RunFolderError,
    RunLockedError,
    config_diff,
    config_fingerprint,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"width": 8}, "optim": {"lr": 0.1}, "outer_steps": 10}
OUTPUTS = ("hparams.pt", "summary.json", "config.toml")


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ---------------------------------------------------------------------- lock
def test_second_folder_in_process_is_refused_naming_the_holder(tmp_path):
    with RunFolder(tmp_path / "run", kind="toy") as run:
        with pytest.raises(RunLockedError) as err:
            RunFolder(tmp_path / "run", kind="toy")
        msg = str(err.value)
        assert "held by an earlier run folder of this same process" in msg
        assert "close()" in msg
        holder = json.loads((run.path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
    with RunFolder(tmp_path / "run", kind="toy") as again:  # released by close
        assert again.resumed


def test_lock_released_on_garbage_collection_and_writes_refused_after_close(tmp_path):
    run = RunFolder(tmp_path, kind="toy")
    del run
    gc.collect()
    run = RunFolder(tmp_path, kind="toy")
    run.close()
    with pytest.raises(RunFolderError, match="closed"):
        run.save_checkpoint(1, {})


HOLD = """
import sys, time
from bilevel.run_folder import RunFolder
run = RunFolder(sys.argv[1], kind="toy")
print("ready", flush=True)
time.sleep(120)
"""

TRY = """
import sys
from bilevel.run_folder import RunFolder, RunLockedError
try:
    RunFolder(sys.argv[1], kind="toy")
except RunLockedError as e:
    print("locked:", e)
else:
    print("taken")
"""


def test_lock_across_processes_and_taken_over_after_sigkill(tmp_path):
    folder = tmp_path / "run"
    with RunFolder(folder, kind="toy"):  # this process holds it: a subprocess is refused
        out, err = _python(TRY, str(folder)).communicate(timeout=60)
        assert out.startswith("locked:") and f"pid {os.getpid()}" in out, err
    holder = _python(HOLD, str(folder))
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on .*command '-c "):
            RunFolder(folder, kind="toy")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.communicate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # taken over silently
        with RunFolder(folder, kind="toy") as run:
            assert run.resumed  # the killed process had created the run
            assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------- modes
def _finished_run(folder: Path, config=CONFIG) -> str:
    with RunFolder(folder, kind="toy", config=config, outputs=OUTPUTS) as run:
        for step in range(3):
            run.metrics.append({"step": step, "loss": 1.0 / (step + 1)})
        run.save_checkpoint(3, {"x": 3})
        run.save_torch("hparams.pt", {"lam": torch.ones(2)})
        run.write_json("summary.json", {"complete": True})
        return run.run_id


def test_new_refuses_another_finished_run_and_leaves_it_intact(tmp_path):
    run_id = _finished_run(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and
              p.name != ".lock"}
    with pytest.raises(RunFolderError) as err:
        RunFolder(tmp_path, kind="toy", config=CONFIG, mode="new", outputs=OUTPUTS)
    msg = str(err.value)
    for name in ("run.json", "checkpoints/ with 1 file", "metrics.jsonl", "hparams.pt",
                 "summary.json", "overwrite", "resume"):
        assert name in msg
    assert {p: p.read_bytes() for p in before} == before
    with RunFolder(tmp_path, kind="toy", config=CONFIG, mode="auto") as run:
        assert run.resumed and run.run_id == run_id and run.load_latest()[0] == 3


def test_folder_with_only_outputs_is_refused_and_overwrite_keeps_other_files(tmp_path):
    for name in OUTPUTS:
        (tmp_path / name).write_text("another run's")
    (tmp_path / "notes.txt").write_text("mine")
    for mode in ("new", "auto"):
        with pytest.raises(RunFolderError, match="hparams.pt, summary.json, config.toml"):
            RunFolder(tmp_path, kind="toy", mode=mode, outputs=OUTPUTS)
    _finished_run(tmp_path / "full")
    with pytest.raises(RunFolderError, match=r"another run \(summary.json\): replace it"):
        RunFolder(tmp_path, kind="toy", outputs="summary.json")  # one name, not letters
    with RunFolder(tmp_path, kind="toy", mode="overwrite", outputs=OUTPUTS) as run:
        assert not run.resumed
    assert _names(tmp_path) == {".lock", "run.json", "checkpoints", "notes.txt", "full"}
    with RunFolder(tmp_path / "full", kind="toy", mode="overwrite", outputs=OUTPUTS) as run:
        assert not run.resumed and run.checkpoints() == [] and run.metrics.read() == []


def test_resume_with_changed_config_names_every_key(tmp_path):
    _finished_run(tmp_path)
    stored = (tmp_path / "run.json").read_text()
    changed = {"model": {"width": 16, "depth": 2}, "optim": {}, "outer_steps": 10}
    for mode in ("resume", "auto"):
        with pytest.raises(ConfigMismatchError) as err:
            RunFolder(tmp_path, kind="toy", config=changed, mode=mode)
        assert err.value.differences == ["model.width", "model.depth", "optim.lr"]
        msg = str(err.value)
        assert "model.width: 8 → 16" in msg and "optim.lr: 0.1 → (absent)" in msg
        assert "model.depth: (absent) → 2" in msg
    assert (tmp_path / "run.json").read_text() == stored


def test_resume_with_grown_outer_steps_updates_the_stored_config(tmp_path):
    _finished_run(tmp_path)
    with pytest.raises(ConfigMismatchError, match="outer_steps: 10 → 5"):
        RunFolder(tmp_path, kind="toy", config={**CONFIG, "outer_steps": 5}, mode="resume")
    grown = {**CONFIG, "outer_steps": 20}
    with RunFolder(tmp_path, kind="toy", config=grown, mode="resume") as run:
        assert run.resumed and run.config == grown
        assert run.fingerprint == config_fingerprint(grown)
    stored = json.loads((tmp_path / "run.json").read_text())
    assert stored["config"] == grown and stored["fingerprint"] == config_fingerprint(grown)
    with RunFolder(tmp_path, kind="toy", mode="resume") as run:  # no config: the stored one
        assert run.config == grown


def test_resume_needs_this_kind_of_run(tmp_path):
    with pytest.raises(RunFolderError, match="does not exist"):
        RunFolder(tmp_path / "missing", kind="toy", mode="resume")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(RunFolderError, match="no run to resume"):
        RunFolder(tmp_path, kind="toy", mode="resume")
    _finished_run(tmp_path / "run")
    with pytest.raises(RunFolderError, match="holds a 'toy' run, not a 'distill' one"):
        RunFolder(tmp_path / "run", kind="distill")
    (tmp_path / "run" / "run.json").write_text('{"format": 2, "run_id": "x"')
    with pytest.raises(RunFolderError, match="run.json is unreadable"):
        RunFolder(tmp_path / "run", kind="toy")


def test_legacy_folder_is_refused_clearly(tmp_path):
    ckpt.atomic_save({"format": 1, "step": 3}, tmp_path / "checkpoints" / "step-00000003.pt")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    for mode in ("auto", "resume"):
        with pytest.raises(RunFolderError, match="older version of bilevel.*format 1"):
            RunFolder(tmp_path, kind="toy", mode=mode)
    with pytest.raises(RunFolderError, match="checkpoints/ with 1 file"):
        RunFolder(tmp_path, kind="toy", mode="new")
    with RunFolder(tmp_path, kind="toy", mode="overwrite") as run:
        assert run.checkpoints() == [] and not (tmp_path / "metrics.jsonl").exists()


def test_bad_paths_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunFolder(tmp_path / "file", kind="toy")
    with pytest.raises(RunFolderError, match=r"file/a/b cannot be created: .*file is a file"):
        RunFolder(tmp_path / "file" / "a" / "b", kind="toy")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(RunFolderError, match="checkpoints is a file"):
        RunFolder(tmp_path / "run", kind="toy")
    assert _names(tmp_path) == {"file", "run"} and _names(tmp_path / "run") == {"checkpoints"}
    with pytest.raises(ValueError, match="keep_checkpoints"):
        RunFolder(tmp_path / "new", kind="toy", keep_checkpoints=0)
    with pytest.raises(ValueError, match="mode"):
        RunFolder(tmp_path / "new", kind="toy", mode="append")
    with pytest.raises(ValueError, match="outputs"):
        RunFolder(tmp_path / "new", kind="toy", outputs=("../elsewhere",))
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_folder_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(RunFolderError, match="not writable"):
        RunFolder(tmp_path / "ro" / "run", kind="toy")


def test_config_diff_and_fingerprint():
    assert config_diff(CONFIG, CONFIG) == []
    assert config_diff(CONFIG, {**CONFIG, "outer_steps": 11}) == []
    assert config_diff(CONFIG, {**CONFIG, "outer_steps": 9}) == ["outer_steps"]
    nested = {"outer": {"steps": 5}, "inner": {"steps": 5}}
    grown = {"outer": {"steps": 9}, "inner": {"steps": 9}}
    assert config_diff(nested, grown, growable=("outer.steps",)) == ["inner.steps"]
    assert config_diff(nested, grown, growable=("steps",)) == []
    assert config_diff({"a": 1}, {"a": True}) == ["a"]
    assert config_diff({"a": 1}, {"a": 1.0}) == []
    assert config_fingerprint({"a": 1, "b": [1, 2]}) == config_fingerprint({"b": [1, 2], "a": 1})
    assert config_fingerprint({"a": 1}) != config_fingerprint({"a": 2})
    with pytest.raises(ValueError, match="JSON"):
        RunFolder("unused", kind="toy", config={"a": object()})


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_everything_created_honours_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with RunFolder(tmp_path / "a" / "run", kind="toy") as run:
            files = [run.save_checkpoint(1, {"x": 1}), run.write_json("s.json", {}),
                     run.write_text("n.txt", "x"), run.save_torch("h.pt", {}),
                     run.path / "run.json", run.path / ".lock",
                     ckpt.atomic_save({}, tmp_path / "plain.pt")]
            run.metrics.append({"step": 0})
            files += [run.path / "metrics.jsonl", run.path / "metrics.csv"]
            for f in files:
                assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
            for d in (run.path, run.checkpoint_dir, tmp_path / "a"):
                assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
    finally:
        os.umask(old)


def test_pruning_keeps_own_newest_whatever_else_lies_there(tmp_path):
    with RunFolder(tmp_path, kind="toy", keep_checkpoints=2) as run:
        legacy = ckpt.atomic_save({"format": 1, "step": 50},
                                  run.checkpoint_dir / "step-00000050.pt")
        foreign = ckpt.atomic_save({"format": FORMAT, "run_id": "f" * 32},
                                   run.checkpoint_dir / "step-00000099-ffffffff.pt")
        for step in range(1, 6):
            run.save_checkpoint(step, {"x": step})
        assert [s for s, _ in run.checkpoints()] == [4, 5]
        assert {foreign.name, legacy.name} <= _names(run.checkpoint_dir)
        step, payload = run.load_latest()
        assert (step, payload["x"], payload["format"], payload["run_id"]) == \
            (5, 5, FORMAT, run.run_id)
        run.save_checkpoint(3, {"x": 3})  # went back: the later ones were abandoned
        assert [s for s, _ in run.checkpoints()] == [3]
        assert len(_names(run.checkpoint_dir)) == 3


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path):
    with RunFolder(tmp_path, kind="toy") as run:
        run.save_checkpoint(1, {"x": 1})
        newest = run.save_checkpoint(2, {"x": 2})
        newest.write_bytes(newest.read_bytes()[:50])
        with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
            assert run.load_latest()[0] == 1
        with pytest.raises(RunFolderError, match="cannot read checkpoint"):
            run.load_checkpoint(newest)


def test_other_formats_foreign_runs_and_typos_are_refused(tmp_path):
    with RunFolder(tmp_path, kind="toy") as run:
        assert run.load_latest() is None
        own = run.checkpoint_dir / run.checkpoint_name(7)
        ckpt.atomic_save({"format": 1, "step": 7}, own)
        with pytest.raises(RunFolderError, match="format 1.*reads format 2.*0.1.x"):
            run.load_latest()
        ckpt.atomic_save({"format": 3, "bilevel": "9.0"}, own)
        with pytest.raises(RunFolderError, match="format 3.*bilevel 9.0"):
            run.load_checkpoint(own)
        ckpt.atomic_save({"format": FORMAT, "run_id": "0" * 32}, tmp_path / "other.pt")
        with pytest.raises(RunFolderError, match="belongs to run 0000"):
            run.load_checkpoint(tmp_path / "other.pt")
        good = run.save_checkpoint(3, {"x": 3})
        assert run.load_checkpoint(good)["x"] == 3
        typo = run.checkpoint_dir / "step-0000003.pt"
        with pytest.raises(RunFolderError, match=f"no checkpoint file {typo}.*{good.name}"):
            run.load_checkpoint(typo)
        with pytest.raises(ValueError, match="payload says step 4"):
            run.save_checkpoint(5, {"step": 4})


def test_stale_temp_files_are_removed_at_open(tmp_path):
    with RunFolder(tmp_path, kind="toy") as run:
        run.save_checkpoint(1, {})
    (tmp_path / "checkpoints" / ".step-00000002-abcdef12.pt.k3j2h1g0.tmp").write_text("x")
    (tmp_path / ".summary.json.a1b2c3d4.tmp").write_text("x")
    (tmp_path / "keep.tmp").write_text("x")
    with RunFolder(tmp_path, kind="toy") as run:
        assert not any(p.name.startswith(".") and p.name.endswith(".tmp")
                       for p in tmp_path.rglob("*"))
        assert (tmp_path / "keep.tmp").exists() and len(run.checkpoints()) == 1


# ---------------------------------------------------------------------- metrics
def test_metrics_append_read_truncate(tmp_path):
    log = MetricsLog(tmp_path, first_columns=("step", "loss", "lr"))
    assert log.read() == [] and log.truncate(3) == []
    log.append({"step": 0, "loss": torch.tensor(0.5)})
    log.append({"step": 1, "loss": float("nan"), "acc": 0.9})
    assert log.read() == [{"step": 0, "loss": 0.5}, {"step": 1, "loss": "nan", "acc": 0.9}]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == \
        ["step,loss,lr,acc", "0,0.5,,", "1,nan,,0.9"]
    log.append({"step": 2, "loss": 0.25})
    assert log.truncate(2) == log.read() == [{"step": 0, "loss": 0.5},
                                             {"step": 1, "loss": "nan", "acc": 0.9}]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == ["0,0.5,,", "1,nan,,0.9"]
    with pytest.raises(ValueError, match="integer 'step'"):
        log.append({"loss": 1.0})
    with pytest.raises(ValueError, match="JSON"):
        log.append({"step": 3, "w": torch.ones(2)})


def test_metrics_torn_last_line_is_dropped_and_repaired(tmp_path):
    log = MetricsLog(tmp_path)
    log.append({"step": 0, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "lo')
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("1,0.")
    assert MetricsLog(tmp_path).read() == [{"step": 0, "loss": 1.0}]
    again = MetricsLog(tmp_path)
    again.append({"step": 1, "loss": 0.5})
    assert again.read() == [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
    assert (tmp_path / "metrics.csv").read_text().splitlines() == ["step,loss", "0,1.0",
                                                                   "1,0.5"]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunFolderError, match="line 2"):
        again.read()


def _session(folder: Path, target: int, kill_after: int | None, torn: str = "") -> None:
    """A toy run: checkpoints every 3 steps; ``kill_after`` steps in, the process "dies":
    the object is dropped without close, with ``torn`` = "line" in the middle of a JSON
    line, with "row" between the JSON line and the CSV row."""
    run = RunFolder(folder, kind="toy", config={"outer_steps": target})
    found = run.load_latest()
    step, x = (found[0], found[1]["x"]) if found else (0, 0.0)
    run.metrics.truncate(step)
    done = 0
    while step < target:
        if done == kill_after:
            if torn:
                line = json.dumps({"step": step, "x": -1.0}) + "\n"
                with open(folder / "metrics.jsonl", "a") as f:
                    f.write(line if torn == "row" else line[:12])
            return  # killed: no close
        x = 0.5 * x + step
        run.metrics.append({"step": step, "x": x})
        step, done = step + 1, done + 1
        if step % 3 == 0:
            run.save_checkpoint(step, {"x": x})
    run.close()


def test_every_step_once_after_any_sequence_of_kills(tmp_path):
    _session(tmp_path / "straight", 12, None)
    killed = tmp_path / "killed"
    for kill_after, torn in [(2, ""), (4, "line"), (1, "row"), (5, "line"), (0, ""),
                             (3, "row"), (None, "")]:
        _session(killed, 12, kill_after, torn)
        gc.collect()
    rows = MetricsLog(killed).read()
    assert [r["step"] for r in rows] == list(range(12))
    assert rows == MetricsLog(tmp_path / "straight").read()
    assert (killed / "metrics.csv").read_text() == \
        (tmp_path / "straight" / "metrics.csv").read_text()

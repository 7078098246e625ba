"""The ``bilevel`` command line: help, strict config errors, run, resume, the MLP example."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.cli import main

ROOT = Path(__file__).resolve().parents[1]

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
name = "truncated"
settings = {{ window = 5 }}

[outer]
lr = 0.05
steps = {steps}
checkpoint_every = 1

[output]
dir = "{out}"
"""


def bilevel(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bilevel", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_help(capsys: pytest.CaptureFixture) -> None:
    r = bilevel("--help")
    assert r.returncode == 0 and "usage: bilevel" in r.stdout, r.stderr
    for args in (["run", "--help"], ["resume", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
        assert "usage: bilevel" in capsys.readouterr().out


@pytest.mark.parametrize("old, new, expected", [
    ("lr = 0.05", "lr = 0.05\nlearning_rate = 1.0", "outer.learning_rate: unknown key"),
    ("lr = 0.05", 'lr = "fast"', "outer.lr: expected float, got str"),
    ("steps = 10", "steps = 1.5", "inner.steps: expected integer, got float"),
    ('dataset = "iris"', 'dataset = "mnist"', "data.dataset: expected one of"),
    ("lr = 0.05\n", "", "outer.lr: missing required field (expected float)"),
    ('name = "truncated"', 'name = "magic"', "estimator.name: expected one of"),
])
def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture, old: str, new: str,
                            expected: str) -> None:
    out = tmp_path / "out"
    text = TINY.format(steps=3, out=out.as_posix())
    assert old in text
    assert main(["run", str(write(tmp_path, text.replace(old, new, 1)))]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_config_subprocess(tmp_path: Path) -> None:
    text = TINY.format(steps=3, out=(tmp_path / "out").as_posix())
    r = bilevel("run", str(write(tmp_path, text.replace("lr = 0.05", "lr = [1]", 1))))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "outer.lr: expected float, got list" in r.stderr


def test_run_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write(tmp_path, TINY.format(steps=4, out=out.as_posix()))
    r = bilevel("run", str(cfg), "--stop-after", "2")  # as if killed after step 2
    assert r.returncode == 0, r.stderr
    assert not (out / "summary.json").exists()
    assert main(["run", str(cfg)]) == 2  # refuses to overwrite a run
    r = bilevel("resume", str(out))
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr and "tuned" in r.stdout
    for name in ("config.toml", "metrics.jsonl", "metrics.csv", "hparams.pt", "summary.json",
                 "outer_loss.png", "val_accuracy.png"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "step-00000004.pt").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().split("\n")
             if line]
    assert steps == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 <= summary["test_acc"] <= 1
    assert {"val_acc", "initial_val_acc", "initial_test_acc", "seconds"} <= set(summary)
    # a deleted last checkpoint is redone by resume
    (out / "checkpoints" / "step-00000004.pt").unlink()
    r = bilevel("resume", str(out))
    assert r.returncode == 0, r.stderr
    assert "at outer step 3" in r.stderr
    assert (out / "checkpoints" / "step-00000004.pt").is_file()


def test_resume_without_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["resume", str(tmp_path)]) == 2
    assert "config.toml" in capsys.readouterr().err


def test_mlp_example_runs() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "tune_mlp_digits.py"),
                        "--outer-steps", "3", "--inner-steps", "10"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "untuned" in r.stdout and "tuned (hypergradients)" in r.stdout
    assert "test acc" in r.stdout

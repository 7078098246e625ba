"""A plain ``pip install .`` (no extras) into a fresh virtual environment runs the
command line's smallest job to the end: everything ``bilevel`` needs is a dependency.

Slow for a test (a fresh environment: torch from the local wheel cache or index, the
other dependencies from the package index), so it runs once, on the real install path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_runs_the_cli(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=tmp_path)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    # the same torch as here: an unpinned torch would pull a multi-GB CUDA build
    run(py, "-m", "pip", "install", "--quiet", f"torch=={torch.__version__.split('+')[0]}")
    run(py, "-m", "pip", "install", "--quiet", str(ROOT))
    bilevel = str(venv / "bin" / "bilevel")
    assert run(bilevel, "--version").stdout.startswith("bilevel ")
    text = (ROOT / "examples" / "configs" / "digits_mlp.toml").read_text()
    for old, new in [("steps = 60", "steps = 3"), ("steps = 20", "steps = 2")]:
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "tiny.toml").write_text(text)
    run(bilevel, "run", "tiny.toml", "-o", "out", "--threads", "1")
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text())["complete"]
    for name in ("hparams.pt", "outer_loss.png", "val_accuracy.png", "config.toml"):
        assert (out / name).is_file(), name
    # the package's type information ships with it
    site = run(py, "-c", "import bilevel, hypergrad, os; print(os.path.dirname("
                         "bilevel.__file__)); print(os.path.dirname(hypergrad.__file__))")
    for folder in site.stdout.split():
        assert (Path(folder) / "py.typed").is_file(), folder
        assert Path(folder).is_relative_to(venv), folder  # the installed copy, not ROOT

"""Warnings and library messages: an outer loop shows each kind of warning once, at the
user's line, counts the rest into its records and a logged summary; ``warnings="all"``
shows each; the ``bilevel`` command's ``-v``/``-q`` set the library's log level."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

import bilevel
import bilevel.cli
import hypergrad as hg
from bilevel import OuterLoop
from bilevel.log import every_warning, verbosity, verbosity_level, warning_mode
from bilevel.sinks import Progress
from hypergrad.errors import (
    INNER_NOT_CONVERGED,
    LINEAR_SOLVE_NOT_CONVERGED,
    kind_of,
    register_library_path,
)

from problems import Ridge

STEPS = 30
KINDS = {INNER_NOT_CONVERGED, LINEAR_SOLVE_NOT_CONVERGED}


def stalled_loop(**kwargs) -> OuterLoop:
    """Ridge regression (float64) whose every outer step warns twice: 3 inner steps cannot
    meet inner_tol = 1e-12, and one CG iteration cannot solve the 8x8 system."""
    r = Ridge.make()
    est = hg.Implicit(solver=hg.ConjugateGradient(maxiter=1), inner_tol=1e-12)
    return OuterLoop(r.problem(steps=3), r.hparams(), r.params0(), est,
                     lambda hp: torch.optim.Adam(hp, lr=0.05), **kwargs)


def convergence(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if issubclass(w.category, hg.ConvergenceWarning)]


def summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "bilevel.outer" and r.levelno == logging.WARNING]


def test_each_kind_shown_once_at_the_users_line_and_counted(tmp_path: Path, caplog) -> None:
    loop = stalled_loop(run_dir=tmp_path / "run")
    caplog.set_level(logging.WARNING, logger="bilevel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # Python's registry de-duplicates nothing here
        line = sys._getframe().f_lineno + 1
        loop.run(STEPS)
    shown = convergence(caught)
    assert sorted(w.message.kind for w in shown) == sorted(KINDS)  # one of each kind
    for w in shown:
        assert (w.filename, w.lineno) == (__file__, line)  # the user's loop.run(...) call
        assert "shows this kind once" in str(w.message)
    assert loop.warning_counts == {kind: STEPS for kind in KINDS}
    # the numbers stay in every step's record, with the step's count of warnings
    rows = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert all(r["warnings"] == 2 for r in rows)
    assert all(r["solve_iterations"] == 1 and r["solve_residual"] > 1e-6 for r in rows)
    assert all(r["inner_grad_norm"] > 1e-12 for r in rows)
    assert len({r["solve_residual"] for r in rows}) > 1  # per-step numbers, not a copy
    assert sorted(summaries(caplog)) == [
        f"ConvergenceWarning (inner problem not converged) x {STEPS} in {STEPS} outer steps; "
        "see metrics.jsonl column inner_grad_norm",
        f"ConvergenceWarning (linear solve did not converge) x {STEPS} in {STEPS} outer "
        "steps; see metrics.jsonl column solve_residual"]
    loop.close()
    assert len(summaries(caplog)) == 2  # close() has nothing left to summarize


def test_a_second_run_call_counts_on_and_shows_nothing_again(caplog) -> None:
    loop = stalled_loop()
    caplog.set_level(logging.WARNING, logger="bilevel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.run(3)
        loop.run(5)
    assert len(convergence(caught)) == 2
    assert loop.warning_counts[LINEAR_SOLVE_NOT_CONVERGED] == 5
    assert [m for m in summaries(caplog) if "linear" in m] == [
        "ConvergenceWarning (linear solve did not converge) x 3 in 3 outer steps; see "
        "loop.history key solve_residual",
        "ConvergenceWarning (linear solve did not converge) x 2 in 2 outer steps; see "
        "loop.history key solve_residual"]


def test_steps_outside_run_are_summarized_on_close(caplog) -> None:
    loop = stalled_loop()
    caplog.set_level(logging.WARNING, logger="bilevel")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for _ in range(3):
            loop.step()
    assert summaries(caplog) == []
    loop.close()
    assert len(summaries(caplog)) == 2 and all("x 3 in 3 outer steps" in m
                                               for m in summaries(caplog))


@pytest.mark.parametrize("how", ["argument", "environment", "context"])
def test_every_warning_on_request(how: str, monkeypatch) -> None:
    """warnings.simplefilter("always") cannot undo the loop's de-duplication; these can."""
    kwargs = {"warnings": "all"} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("BILEVEL_WARNINGS", "all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop = stalled_loop(**kwargs)
        if how == "context":
            with every_warning():
                loop.run(4)
        else:
            loop.run(4)
    shown = convergence(caught)
    assert len(shown) == 8 and {w.message.kind for w in shown} == KINDS
    assert all("shows this kind once" not in str(w.message) for w in shown)
    assert all(w.filename == __file__ for w in shown)
    assert sum(loop.warning_counts.values()) == 8


def test_an_error_filter_still_raises_at_the_first_warning() -> None:
    loop = stalled_loop()
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ConvergenceWarning)
        with pytest.raises(hg.ConvergenceWarning, match="not converged"):
            loop.run(3)
    assert loop.global_step == 0


def test_bad_warning_modes_are_refused(monkeypatch) -> None:
    with pytest.raises(hg.BilevelInputError, match=r"warnings must be one of 'once', 'all'"):
        stalled_loop(warnings="every")
    monkeypatch.setenv("BILEVEL_WARNINGS", "loud")
    with pytest.raises(hg.BilevelInputError, match=r"\$BILEVEL_WARNINGS must be one of"):
        warning_mode()
    assert warning_mode("once") == "once"


def test_direct_estimator_calls_warn_at_the_users_line() -> None:
    """Outside a loop every warning is shown (numbers differ), each at the caller's line,
    past hypergrad's and torch's frames."""
    r = Ridge.make()
    est = hg.Implicit(solver=hg.ConjugateGradient(maxiter=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        est(r.problem(steps=50), r.hparams(), r.params0())
    (w,) = convergence(caught)
    assert (w.filename, w.lineno) == (__file__, line)
    assert w.message.kind == LINEAR_SOLVE_NOT_CONVERGED and "residual" in str(w.message)


def test_kinds_leave_out_the_numbers() -> None:
    a = UserWarning("cg: residual 1.5e-03 after 12 iterations (lr -0.5, nan)")
    b = UserWarning("cg: residual 2.25e+01 after 3 iterations (lr 7, inf)")
    assert kind_of(a) == kind_of(b) == "cg: residual # after # iterations (lr #, #)"
    assert kind_of(hg.ConvergenceWarning("x 1.0", kind="k")) == "k"


def test_user_stacklevel_skips_registered_folders(tmp_path: Path) -> None:
    """A frame in a registered folder is library code; the next one out is the user's."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "helper.py").write_text("from hypergrad.errors import user_stacklevel\n"
                                   "def level():\n    return inner()\n"
                                   "def inner():\n    return user_stacklevel()\n")
    sys.path.insert(0, str(lib))
    try:
        import helper  # type: ignore[import-not-found]

        assert helper.level() == 2  # not registered: the caller of inner() counts as user
        register_library_path(lib)
        assert helper.level() == 3  # registered: this test's frame
    finally:
        sys.path.remove(str(lib))
        sys.modules.pop("helper", None)


# --- library messages and the command line's switch ----------------------------------------

def test_library_roots_hold_a_null_handler() -> None:
    for name in ("bilevel", "hypergrad"):
        assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger(name).handlers)


@pytest.mark.parametrize("verbose, quiet, level", [
    (0, 0, logging.INFO), (0, 1, logging.WARNING), (0, 2, logging.ERROR), (1, 0, logging.DEBUG),
    (3, 0, logging.DEBUG), (1, 1, logging.INFO)])
def test_verbosity_level(verbose: int, quiet: int, level: int) -> None:
    assert verbosity_level(verbose, quiet) == level


def test_verbosity_is_restored_and_checked() -> None:
    logger = logging.getLogger("bilevel")
    before = (logger.level, list(logger.handlers))
    with verbosity("debug"):
        assert logger.level == logging.DEBUG and len(logger.handlers) == len(before[1]) + 1
    assert (logger.level, list(logger.handlers)) == before
    with pytest.raises(hg.BilevelInputError, match="level must be a logging level"):
        bilevel.set_verbosity("chatty")


def fake_command(args) -> int:
    for name, level in (("bilevel.outer", logging.DEBUG), ("hypergrad.x", logging.INFO),
                        ("bilevel.outer", logging.WARNING)):
        logging.getLogger(name).log(level, "%s message", logging.getLevelName(level).lower())
    return 0


@pytest.mark.parametrize("flags, shown", [
    ([], ["hypergrad: info message", "bilevel: warning: warning message"]),
    (["-q"], ["bilevel: warning: warning message"]),
    (["-qq"], []),
    (["-v"], ["bilevel.outer: debug: debug message", "hypergrad: info message",
              "bilevel: warning: warning message"]),
])
@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_verbosity_switch(flags: list[str], shown: list[str], where: str, tmp_path: Path,
                              monkeypatch, capsys) -> None:
    """-v/-q are valid before the command and after it, for every command."""
    monkeypatch.setattr(bilevel.cli, "cmd_run", fake_command)
    argv = flags + ["run", "cfg.toml"] if where == "before" else ["run", "cfg.toml"] + flags
    assert bilevel.cli.main(argv) == 0
    assert capsys.readouterr().err.splitlines() == shown
    logging.getLogger("bilevel.outer").warning("after main")  # main restored the loggers
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", [["resume", "x"], ["tune", "x", "--study", "s"],
                                     ["distill"]])
def test_every_command_takes_the_switch(command: list[str]) -> None:
    args = bilevel.cli.build_parser().parse_args(command + ["-q"])
    assert (args.quiet, args.verbose) == (1, 0)


IMPLICIT_RUN = """\
dtype = "float64"
[model]
sizes = [4]
[data]
dataset = "iris"
[hyperparameters]
tune = ["log_wd"]
[inner]
steps = 5
[estimator]
name = "implicit"
settings = {{ solver = {{ name = "cg", maxiter = 1 }} }}
[outer]
lr = 0.05
steps = 3
[output]
dir = "{out}"
"""


@pytest.mark.parametrize("flags", [[], ["-q"], ["-qq"]])
def test_bilevel_run_shows_one_warning_and_a_summary(flags: list[str], tmp_path: Path,
                                                     capsys) -> None:
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(IMPLICIT_RUN.format(out=out.as_posix()))
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # the de-duplication is the loop's, not Python's
        assert bilevel.cli.main(["run", str(cfg), *flags]) == 0
    err = capsys.readouterr().err
    # the command shows each warning as one line: the first linear-solve one only (none
    # under -qq, errors only)
    shown = [s for s in err.splitlines()
             if s.startswith("bilevel: warning: ConvergenceWarning: implicit: the linear")]
    assert len(shown) == (0 if flags == ["-qq"] else 1), err
    line = ("bilevel: warning: ConvergenceWarning (linear solve did not converge) x 3 in 3 "
            "outer steps; see metrics.jsonl column solve_residual")
    assert (line in err.splitlines()) == (flags != ["-qq"]), err
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["warnings"] >= 1 for r in rows] == [True] * 3


def test_progress_lines_go_through_logging_when_it_shows_them(monkeypatch, caplog,
                                                              capsys) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain line printer
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with verbosity("info"):
        caplog.set_level(logging.INFO, logger="bilevel")
        bar = Progress(total=10, every=5)
        for step in range(10):
            bar.write({"step": step, "outer_loss": 1.0 / (step + 1), "hypergrad_norm": 0.5})
    lines = [r.getMessage() for r in caplog.records if r.name == "bilevel.sinks"]
    assert lines == ["outer step 5/10  loss 0.2  hg 0.5", "outer step 10/10  loss 0.1  hg 0.5"]
    assert capsys.readouterr().err.splitlines() == ["bilevel: " + s for s in lines]

"""``bilevel tune``: one Optuna worker per process, sharing a study through a storage."""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest

import bilevel.tune.worker as worker
import hypergrad as hg
from bilevel.cli import main
from bilevel.config import ConfigError, load_config
from bilevel.tune.search import SEARCH_TABLE

ROOT = Path(__file__).resolve().parents[1]
SEARCH = """
[search]
"outer.lr" = { float = [1e-3, 1e-1], log = true }
"inner.steps" = { int = [2, 4] }
"""


def config(tmp_path: Path, search: str = SEARCH) -> Path:
    """The digits MLP example with few steps and a [search] table."""
    text = (ROOT / "examples" / "configs" / "digits_mlp.toml").read_text()
    for old, new in [("steps = 60", "steps = 3"), ("steps = 20", "steps = 2"),
                     ("checkpoint_every = 5", "checkpoint_every = 1"),
                     ('dir = "runs/digits_mlp"', f'dir = "{tmp_path / "plain"}"')]:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "cfg.toml"
    path.write_text(text + search)
    return path


def tune(path: Path, out: Path, *args: str) -> list[str]:
    return ["tune", str(path), "--out", str(out), "--pruner", "none", *args]


def worker_process(path: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bilevel", *tune(path, out, *args),
                             "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=out.parent)


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err


def check_study(study: optuna.Study, out: Path, n: int) -> None:
    trials = study.get_trials()
    assert len(trials) == n
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(n))
    dirs = {t.user_attrs["run_dir"] for t in trials}
    assert len(dirs) == n  # no trial ran twice or shared a folder
    for t in trials:
        folder = out / study.study_name / f"trial-{t.number}"
        assert Path(t.user_attrs["run_dir"]) == folder.resolve()
        assert (folder / "hparams.pt").is_file() and (folder / "summary.json").is_file()


def test_in_memory_trials(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    assert main(tune(path, out, "--study", "s", "--n-trials", "3")) == 0
    err = capsys.readouterr().err
    assert "only this process sees it" in err
    for i in range(3):
        folder = out / "s" / f"trial-{i}"
        assert (folder / "hparams.pt").is_file() and (folder / "summary.json").is_file()
        assert json.loads((folder / "summary.json").read_text())["complete"]
        text = (folder / "config.toml").read_text()
        assert f"[{SEARCH_TABLE}]" not in text
        cfg = load_config(folder / "config.toml")
        assert 2 <= cfg.inner.steps <= 4 and Path(cfg.output.dir) == folder
        assert f"trial {i}: value" in err
    # an in-memory study restarts at trial 0: refused rather than mixed into old folders
    assert main(tune(path, out, "--study", "s", "--n-trials", "1")) == 2
    assert "holds an earlier study's trials" in capsys.readouterr().err


def test_trial_value_and_attributes(tmp_path: Path) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    args = argparse.Namespace(config=str(path), study="api", storage=None, out=str(out),
                              monitor=None, pruner="none", direction=None)
    s = worker.setup(args)
    assert s.monitor == "eval_val_loss" and s.direction == "minimize"
    study = worker.open_study(args, s.direction)
    (trial,) = worker.work(s, study, 1)
    records = [json.loads(line) for line in
               (out / "api" / "trial-0" / "metrics.jsonl").read_text().splitlines()]
    last = [r["eval_val_loss"] for r in records if "eval_val_loss" in r][-1]
    assert trial.value == pytest.approx(last)
    assert trial.user_attrs["values"] == trial.params
    assert trial.user_attrs["config"]["inner"]["steps"] == trial.params["inner.steps"]
    assert trial.user_attrs["curve_eval_val_loss"][-1][1] == pytest.approx(last)


def test_invalid_combination_fails_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    real = worker.build_config

    def build(cfg: dict, values: dict) -> tuple:
        if values["inner.steps"] == 3:
            raise ConfigError("search: the trial's values (inner.steps = 3) make an invalid "
                              "config: no")
        return real(cfg, values)

    monkeypatch.setattr(worker, "build_config", build)
    args = argparse.Namespace(config=str(path), study="bad", storage=None, out=str(out),
                              monitor=None, pruner="none", direction=None)
    s = worker.setup(args)
    study = worker.open_study(args, s.direction)
    study.enqueue_trial({"outer.lr": 0.01, "inner.steps": 3})
    study.enqueue_trial({"outer.lr": 0.01, "inner.steps": 2})
    failed, ok = worker.work(s, study, 2)  # the worker goes on after the failed trial
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "inner.steps = 3" in failed.user_attrs["fail_reason"]
    assert ok.state == optuna.trial.TrialState.COMPLETE


def test_sqlite_two_workers_and_best(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    finish([worker_process(path, out, "--study", "sq", "--storage", url, "--n-trials", "2")
            for _ in range(2)])
    check_study(optuna.load_study(study_name="sq", storage=url), out, 4)

    assert main(tune(path, out, "--study", "sq", "--storage", url, "--best")) == 0
    printed = capsys.readouterr().out
    best = optuna.load_study(study_name="sq", storage=url).best_trial
    assert f"best trial {best.number}:" in printed
    assert all(k in printed for k in best.params)
    text = (out / "sq" / "best.toml").read_text()
    assert f"[{SEARCH_TABLE}]" not in text
    cfg = load_config(out / "sq" / "best.toml")
    assert cfg.inner.steps == best.params["inner.steps"]
    assert cfg.outer.lr == best.params["outer.lr"]
    assert (out / "sq" / "best_hparams.pt").read_bytes() == \
        (out / "sq" / f"trial-{best.number}" / "hparams.pt").read_bytes()
    assert main(["run", str(out / "sq" / "best.toml")]) == 0  # runnable
    assert (out / "sq" / "best" / "hparams.pt").is_file()


def test_journal_two_workers(tmp_path: Path) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    storage = f"journal:{tmp_path / 'tune.log'}"
    finish([worker_process(path, out, "--study", "j", "--storage", storage, "--n-trials", "2")
            for _ in range(2)])
    check_study(optuna.load_study(study_name="j", storage=worker.storage(storage)), out, 4)


def test_diverging_trial_is_pruned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = config(tmp_path, '\n[search]\n"hyperparameters.lr" = { categorical = [0.05, 1e6] }\n')
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    study = optuna.create_study(study_name="div", storage=url)
    study.enqueue_trial({"hyperparameters.lr": 1e6})
    study.enqueue_trial({"hyperparameters.lr": 0.05})
    assert main(tune(path, tmp_path / "out", "--study", "div", "--storage", url,
                     "--n-trials", "2")) == 0
    assert "trial 0: pruned" in capsys.readouterr().err
    diverged, ok = optuna.load_study(study_name="div", storage=url).get_trials()
    assert diverged.state == optuna.trial.TrialState.PRUNED
    assert "DivergenceError" in diverged.user_attrs["prune_reason"]
    assert ok.state == optuna.trial.TrialState.COMPLETE


@pytest.mark.parametrize("search, expected", [
    ('"outer.lrr" = { float = [0.1, 0.2] }', 'search."outer.lrr": unknown key'),
    ('"data.val" = { float = [0.1, 0.2] }', 'search."data.val": cannot be searched'),
    ('"inner.steps" = { int = [0, 4] }', 'search."inner.steps": low = 0'),
    ('"outer.lr" = { int = [1, 2] }', 'search."outer.lr": int needs an integer key'),
    ("", "no [search] table"),
])
def test_bad_search_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture, search: str,
                            expected: str) -> None:
    path, out = config(tmp_path, f"\n[search]\n{search}\n" if search else ""), tmp_path / "out"
    assert main(tune(path, out, "--study", "s")) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()  # before any work


@pytest.mark.parametrize("args, expected", [
    (["--best"], "--best needs the --storage"),
    (["--monitor", "eval_val_acc", "--direction", "minimize", "--storage", "journal:"],
     "journal: needs a file"),
    (["--monitor", "eval_nothing"], "--monitor eval_nothing"),
    (["--study", "a/b"], "--study"),
])
def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                              expected: str) -> None:
    if "--study" not in args:
        args = ["--study", "s", *args]
    assert main(tune(config(tmp_path), tmp_path / "out", *args)) == 2
    assert expected in capsys.readouterr().err


def test_study_direction_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    optuna.create_study(study_name="d", storage=url, direction="maximize")
    assert main(tune(config(tmp_path), tmp_path / "out", "--study", "d", "--storage", url,
                     "--n-trials", "1")) == 2
    assert "is to maximize" in capsys.readouterr().err


def test_run_ignores_search_table(tmp_path: Path) -> None:
    path = config(tmp_path)
    assert main(["run", str(path), "--stop-after", "1"]) == 0
    assert (tmp_path / "plain" / "hparams.pt").is_file()


def test_multi_objective_with_constraint_and_pareto(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    common = ["--study", "mo", "--storage", url, "--objective", "eval_val_loss",
              "--objective", "train_seconds"]
    assert main(tune(path, out, *common, "--n-trials", "3", "--sampler", "nsga2",
                     "--constraint", "peak_memory_mib<=1e9",
                     "--constraint", "eval_val_acc>=0")) == 0
    assert "trial 2: value" in capsys.readouterr().err
    study = optuna.load_study(study_name="mo", storage=url)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    for t in study.get_trials():
        records = [json.loads(line) for line in
                   Path(t.user_attrs["run_dir"], "metrics.jsonl").read_text().splitlines()]
        assert t.values[0] == pytest.approx(records[-1]["eval_val_loss"])
        assert t.values[1] == pytest.approx(sum(r["step_seconds"] for r in records))
        assert t.constraints["peak_memory_mib<=1e+09"] < 0  # feasible
        assert t.constraints["eval_val_acc>=0"] == pytest.approx(
            -records[-1]["eval_val_acc"])
        assert t.user_attrs["curve_eval_val_loss"]  # the curve, as report() is single-only
        assert not t.intermediate_values
    # --best on several objectives prints the front and writes pareto.json, no best.toml
    assert main(tune(path, out, *common, "--best")) == 0
    printed = capsys.readouterr().out
    assert "Pareto front of study mo" in printed
    assert not (out / "mo" / "best.toml").exists()
    rows = json.loads((out / "mo" / "pareto.json").read_text())
    assert {r["number"] for r in rows} <= {0, 1, 2} and rows
    pick = rows[0]["number"]
    assert main(tune(path, out, *common, "--best", "--trial", str(pick))) == 0
    assert load_config(out / "mo" / "best.toml").inner.steps == \
        study.trials[pick].params["inner.steps"]
    assert main(tune(path, out, *common, "--best", "--trial", "99")) == 2
    assert "--trial 99: not a complete trial" in capsys.readouterr().err


def test_single_objective_constraint_makes_best_infeasible(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture
                                                          ) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    args = ["--study", "c", "--storage", url, "--constraint", "eval_val_acc>=2"]
    assert main(tune(path, out, *args, "--n-trials", "1")) == 0  # accuracy can't reach 2
    assert "over budget: eval_val_acc>=2" in capsys.readouterr().err
    assert main(tune(path, out, *args, "--best")) == 2
    assert "No feasible trials" in capsys.readouterr().err
    mo = [*args, "--objective", "eval_val_loss", "--objective", "train_seconds"]
    assert main(tune(path, out, *[a if a != "c" else "c2" for a in mo], "--n-trials",
                     "1")) == 0
    assert main(tune(path, out, *[a if a != "c" else "c2" for a in mo], "--best")) == 2
    assert "within its --constraint budgets" in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--objective", "eval_val_loss", "--objective", "eval_val_loss"], "repeats a key"),
    (["--objective", "wall"], "--objective wall: not a key of the run's records"),
    (["--objective", "eval_val_loss", "--objective", "train_seconds", "--direction",
      "minimize"], "--direction: 1 given for 2 objective(s)"),
    (["--objective", "eval_val_acc", "--monitor", "eval_val_loss"],
     "improves in the other direction"),
    (["--constraint", "nothing<=3"], "--constraint nothing"),
    (["--monitor", "train_seconds"], "--monitor train_seconds: not a key"),
    (["--storage", "journal:x.log", "--heartbeat", "5"], "journal storage records no "
     "heartbeats"),
    (["--sampler", "cmaes"] if importlib.util.find_spec("cmaes") is None else
     ["--trial", "1"], "pip install cmaes" if importlib.util.find_spec("cmaes") is None
     else "--trial NUMBER goes with --best"),
    (["--trial", "1"], "--trial NUMBER goes with --best"),
])
def test_bad_objective_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        args: list[str], expected: str) -> None:
    out = tmp_path / "out"
    assert main(tune(config(tmp_path), out, "--study", "s", *args)) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("text", ["x<3", "x<=inf", "<=3", "x<=three"])
def test_constraint_syntax(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="KEY<=LIMIT"):
        worker.constraint(text)
    c = worker.constraint(" eval_val_acc >= 0.9 ")
    assert (c.key, c.op, c.limit, c.violation(0.95)) == ("eval_val_acc", ">=", 0.9,
                                                         pytest.approx(-0.05))


def test_solver_budget_searched_and_convergence_warnings_counted(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One CG iteration cannot solve the implicit system: every outer step warns; the trial
    counts the warnings instead of printing each, and its config holds the drawn solver."""
    path = config(tmp_path, '\n[search]\n"estimator.settings.solver.maxiter" = '
                            '{ int = [1, 1] }\n')
    path.write_text(path.read_text().replace('name = "unrolled"', 'name = "implicit"'))
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("error", hg.ConvergenceWarning)  # none may escape the trial
        assert main(tune(path, out, "--study", "w", "--n-trials", "1", "--threads", "1")) == 0
    err = capsys.readouterr().err
    assert "trial 0: value" in err
    counted = re.search(r"(\d+) ConvergenceWarning\(s\), the last: implicit: the linear "
                        r"solve stopped", err)
    assert counted and int(counted.group(1)) >= 2  # at least one per outer step
    # other warnings are shown once, after the trial (shown inside the recording, one
    # was recorded again and again: a loop that ate all memory)
    assert err.count("log_lr stays at lr") == 1
    cfg = load_config(out / "w" / "trial-0" / "config.toml")
    assert cfg.estimator.settings["solver"] == {"name": "cg", "maxiter": 1}


def test_a_study_keeps_its_objective_keys(tmp_path: Path, capsys: pytest.CaptureFixture
                                          ) -> None:
    path, out = config(tmp_path), tmp_path / "out"
    url = f"sqlite:///{tmp_path / 'tune.db'}"
    two = ["--objective", "eval_val_loss", "--objective", "train_seconds"]
    assert main(tune(path, out, "--study", "k", "--storage", url, *two, "--n-trials",
                     "1")) == 0
    assert optuna.load_study(study_name="k", storage=url).metric_names == \
        ["eval_val_loss", "train_seconds"]
    capsys.readouterr()
    # a worker scoring other keys (same directions) is refused before any trial
    for other, said in [(["--objective", "train_seconds", "--objective", "eval_val_loss"],
                         "the study 'k' scores eval_val_loss, train_seconds"),
                        ([], "is to minimize eval_val_loss, minimize train_seconds")]:
        assert main(tune(path, out, "--study", "k", "--storage", url, *other,
                         "--n-trials", "1")) == 2
        assert said in capsys.readouterr().err
    assert len(optuna.load_study(study_name="k", storage=url).trials) == 1
    # --best without --objective reads the study's keys
    assert main(tune(path, out, "--study", "k", "--storage", url, "--best")) == 0
    assert "minimize eval_val_loss, minimize train_seconds" in capsys.readouterr().out


def test_solver_fields_are_checked_against_every_searched_solver(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = config(tmp_path, '\n[search]\n"estimator.settings.solver" = { categorical = '
                            '["cg", "direct"] }\n"estimator.settings.solver.maxiter" = '
                            '{ int = [5, 10] }\n')
    path.write_text(path.read_text().replace('name = "unrolled"', 'name = "implicit"'))
    assert main(tune(path, tmp_path / "out", "--study", "s")) == 2
    assert ('search."estimator.settings.solver.maxiter": unknown key: the \'direct\' solver '
            'takes') in capsys.readouterr().err


@pytest.mark.parametrize("args, expected", [
    (["--out", "FILE"], "--out/--study: cannot create"),
    (["--study", "x" * 300, "--storage", "sqlite:///DB"], "--out/--study: cannot create"),
    (["--storage", "journal:/nonexistent/dir/j.log"], "the folder of /nonexistent/dir/j.log"),
    (["--storage", "sqlite:////nonexistent/dir/x.db"], "--storage sqlite:////nonexistent"),
    (["--heartbeat", "5"], "--heartbeat: an in-memory study"),
    (["--study", "a\nb"], "must be usable as a folder name"),
])
def test_bad_places_exit_2_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            args: list[str], expected: str) -> None:
    (tmp_path / "FILE").write_text("")
    db = tmp_path / "t.db"
    args = [a.replace("FILE", str(tmp_path / "FILE")).replace("DB", str(db)) for a in args]
    if "--study" not in args:
        args = ["--study", "s", *args]
    start = time.perf_counter()
    assert main(tune(config(tmp_path), tmp_path / "out", *args)) == 2
    assert expected in capsys.readouterr().err
    assert time.perf_counter() - start < 5  # no retries of a storage that cannot open
    if db.exists():
        assert not optuna.get_all_study_summaries(f"sqlite:///{db}")


def test_plain_postgresql_urls_get_the_installed_driver(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    found = {"psycopg": None, "psycopg2": object()}
    monkeypatch.setattr(worker.importlib.util, "find_spec", lambda name: found.get(name))
    assert worker._driver("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert worker._driver("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert worker._driver("sqlite:///x.db") == "sqlite:///x.db"
    found["psycopg"] = object()  # psycopg 3, SQLAlchemy's default, is there: unchanged
    assert worker._driver("postgresql://u@h/db") == "postgresql://u@h/db"

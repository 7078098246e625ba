"""Optuna pruning on the outer curve: real in-memory studies on a small ridge problem."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch

import hypergrad as hg
from bilevel.outer import OuterLoop
from bilevel.tune.pruning import OptunaPruning, run_trial

from problems import Ridge

R = Ridge.make()
STEPS = 6  # outer steps per trial
INNER = 150  # inner steps: converged for every shift used below (no ConvergenceWarning)
PRUNED, COMPLETE, FAIL = (optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE,
                          optuna.trial.TrialState.FAIL)


pytestmark = pytest.mark.usefixtures("quiet_optuna")


def val_loss(hparams, params) -> dict:
    res = R.Xv @ params["w"] - R.yv
    return {"loss": float(0.5 * res @ res / R.Xv.shape[0])}


def ridge_loop(shift: float = 0.0, callbacks=(), run_dir: Path | None = None,
               inner_lr: float | None = None, **kw) -> OuterLoop:
    """The ridge problem with every log-regulariser raised by ``shift``: the larger, the
    worse the validation loss all along a short run (0.51, 0.91, 1.41, 1.93 at step 1
    for shifts 0-3), so later trials of ``shift=trial.number`` are worse."""
    r = Ridge(R.X, R.y, R.Xv, R.yv, R.lam + shift)
    inner = None if inner_lr is None else hg.SGD(lr=inner_lr / r.eigs()[1])
    kw = {"evaluate": val_loss, "eval_every": 1, **kw}
    return OuterLoop(r.problem(optimizer=inner, steps=INNER), r.hparams(), r.params0(),
                     "implicit", lambda hp: torch.optim.Adam(hp, lr=0.05),
                     callbacks=callbacks, run_dir=run_dir, **kw)


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]


def objective(tmp_path: Path | None = None, monitor: str = "eval_loss", every: int = 1,
              diverge: tuple[int, ...] = (), **kw):
    """Trial n runs ``ridge_loop(shift=n)``; the trials in ``diverge`` use an inner step
    size of 10/L (the inner run diverges: DivergenceError at the first step)."""
    def run(trial: optuna.Trial) -> float:
        pruning = OptunaPruning(trial, monitor, every, **kw)
        run_dir = None if tmp_path is None else tmp_path / f"trial-{trial.number}"
        loop = ridge_loop(trial.number, [pruning], run_dir,
                          inner_lr=10.0 if trial.number in diverge else None)
        history = run_trial(loop, STEPS, pruning)
        return history[-1][monitor]
    return run


def states(study: optuna.Study) -> list:
    return [t.state for t in study.trials]


def reported(trial: optuna.Trial) -> dict[int, float]:
    """The values reported to a trial that has not finished."""
    return trial.study.trials[trial.number].intermediate_values


# --- pruning by the study's pruner --------------------------------------------------------


def test_a_bad_trial_is_pruned_and_its_folder_resumes(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    study.optimize(objective(tmp_path), n_trials=3)
    assert states(study) == [COMPLETE, PRUNED, PRUNED]
    good, bad = study.trials[0], study.trials[1]
    assert list(good.intermediate_values) == list(range(1, STEPS + 1))  # loop.global_step
    assert good.user_attrs["curve_eval_loss"] == [[s, v] for s, v in
                                                  good.intermediate_values.items()]
    # pruned at its first report, worse than the median of trial 0 there
    assert bad.user_attrs["pruned_step"] == 1
    reason = bad.user_attrs["prune_reason"]
    assert reason.startswith("trial pruned at step 1: eval_loss=0.9") and "MedianPruner" in reason
    assert bad.value == pytest.approx(bad.intermediate_values[1])  # Optuna's rule
    folder = tmp_path / "trial-1"
    assert [r["step"] for r in rows(folder)] == [0]
    assert [p.name for p in (folder / "checkpoints").glob("*.pt")]
    # the loop was closed (lock released): the same run reopens and resumes
    again = ridge_loop(1, run_dir=folder)
    assert again.resume() == 1
    again.run(3)
    again.close()
    assert [r["step"] for r in rows(folder)] == [0, 1, 2]


def test_every_third_value_is_reported_and_a_resumed_loop_keeps_the_cadence(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    pruning = OptunaPruning(trial, "outer_loss", every=3)
    loop = ridge_loop(callbacks=[pruning], run_dir=tmp_path / "run")
    run_trial(loop, 4, pruning)
    assert list(reported(trial)) == [3]
    loop.close()
    loop = ridge_loop(callbacks=[pruning], run_dir=tmp_path / "run")
    loop.resume()
    run_trial(loop, 10, pruning)
    loop.close()
    assert list(reported(trial)) == [3, 6, 9]
    assert [s for s, _ in trial.user_attrs["curve_outer_loss"]] == [3, 6, 9]
    # evaluation metrics: every 2nd evaluation of a loop evaluating every 2nd step
    trial = study.ask()
    pruning = OptunaPruning(trial, "eval_loss", every=2)
    run_trial(ridge_loop(callbacks=[pruning], eval_every=2), 10, pruning)
    assert list(reported(trial)) == [4, 8]



def test_a_new_trial_resuming_a_folder_gets_the_earlier_curve(tmp_path):
    """The re-run of a trial whose worker died: a new trial and callback on the resumed
    folder report the checkpoint's earlier values first, then go on at the same cadence."""
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    dead = study.ask()
    pruning = OptunaPruning(dead, "outer_loss", every=2)
    loop = ridge_loop(callbacks=[pruning], run_dir=tmp_path / "run")
    run_trial(loop, 5, pruning)
    loop.close()
    first = dict(reported(dead))
    assert list(first) == [2, 4]
    again = study.ask()
    pruning = OptunaPruning(again, "outer_loss", every=2)
    loop = ridge_loop(callbacks=[pruning], run_dir=tmp_path / "run")
    assert loop.resume() == 5
    run_trial(loop, 8, pruning)
    loop.close()
    values = reported(again)
    assert list(values) == [2, 4, 6, 8]
    assert values[2] == first[2] and values[4] == first[4]
    assert [s for s, _ in again.user_attrs["curve_outer_loss"]] == [2, 4, 6, 8]

# Each pruner on four trials of shift 0..3 (each worse than the last at every step):
# True: trials 1-3 are pruned; False: none is; None: some are (Hyperband's brackets
# depend on a hash of the study name and trial number).
PRUNERS = {
    "median": (lambda: optuna.pruners.MedianPruner(n_startup_trials=1), True),
    "percentile": (lambda: optuna.pruners.PercentilePruner(25.0, n_startup_trials=1), True),
    "successive_halving": (lambda: optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=2), True),
    "hyperband": (lambda: optuna.pruners.HyperbandPruner(
        min_resource=1, max_resource=STEPS, reduction_factor=2), None),
    "threshold": (lambda: optuna.pruners.ThresholdPruner(upper=0.8), True),
    # the curves keep improving: a patient pruner never asks the median pruner
    "patient": (lambda: optuna.pruners.PatientPruner(
        optuna.pruners.MedianPruner(n_startup_trials=1), patience=1), False),
    # all of a trial's differences to trial 0 are > 0: p = 2^-4 < 0.1 at the 4th report
    "wilcoxon": (lambda: optuna.pruners.WilcoxonPruner(p_threshold=0.1), True),
}


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("name", list(PRUNERS))
def test_every_optuna_pruner_works(name):
    if name == "wilcoxon":
        pytest.importorskip("scipy")
    make, prunes = PRUNERS[name]
    study = optuna.create_study(pruner=make(), study_name="pruning")
    study.optimize(objective(), n_trials=4)
    assert study.trials[0].state == COMPLETE
    later = states(study)[1:]
    if prunes is True:
        assert later == [PRUNED] * 3
    elif prunes is False:
        assert later == [COMPLETE] * 3
    else:
        assert PRUNED in later and set(later) <= {PRUNED, COMPLETE}
    pruner = type(study.pruner).__name__
    for t in study.trials:
        curve = t.user_attrs["curve_eval_loss"]
        assert [s for s, _ in curve] == list(t.intermediate_values)
        if t.state == PRUNED:
            assert pruner in t.user_attrs["prune_reason"]
            assert curve[-1][0] == t.user_attrs["pruned_step"] < STEPS
        else:
            assert len(curve) == STEPS and "prune_reason" not in t.user_attrs
    if name == "wilcoxon":
        assert all(t.user_attrs["pruned_step"] == 4 for t in study.trials[1:])


# --- runs that blow up --------------------------------------------------------------------


def test_a_diverging_trial_is_pruned_not_raised(tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1.0))
    study.optimize(objective(tmp_path, diverge=(1,)), n_trials=3)
    assert states(study) == [COMPLETE, PRUNED, PRUNED]
    diverged = study.trials[1]
    assert diverged.user_attrs["prune_reason"].startswith(
        "trial pruned at step 0: DivergenceError: implicit: the inner run diverged")
    assert diverged.intermediate_values == {} and diverged.user_attrs["pruned_step"] == 0
    assert (tmp_path / "trial-1" / "checkpoints").is_dir()  # step 0 kept, lock released
    assert ridge_loop(1, run_dir=tmp_path / "trial-1").resume() == 0
    # shift 2: a finite loss of 1.4 > upper: the threshold pruner stops it at once
    assert "ThresholdPruner" in study.trials[2].user_attrs["prune_reason"]
    assert study.trials[2].user_attrs["pruned_step"] == 1


def test_non_finite_values_and_large_hypergradients_prune():
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    pruning = OptunaPruning(trial, "score")
    loop = ridge_loop(callbacks=[pruning], metrics=lambda hp: {"score": math.nan})
    with pytest.raises(optuna.TrialPruned, match=r"step 1: score=nan \(not reported\)"):
        run_trial(loop, STEPS, pruning)
    assert reported(trial) == {} and len(loop.history) == 1
    trial = study.ask()
    pruning = OptunaPruning(trial, "eval_loss", max_hypergrad_norm=1e-9)
    with pytest.raises(optuna.TrialPruned, match=r"step 1: hypergrad_norm=\S+ > "
                                                 r"max_hypergrad_norm=1e-09"):
        run_trial(ridge_loop(callbacks=[pruning]), STEPS, pruning)
    assert trial.user_attrs["pruned_step"] == 1


def test_other_errors_fail_the_trial_and_release_the_folder(tmp_path):
    def broken(hparams, params):
        raise RuntimeError("evaluation broke")

    def run(trial):
        pruning = OptunaPruning(trial)
        loop = ridge_loop(callbacks=[pruning], run_dir=tmp_path / "run", evaluate=broken)
        return run_trial(loop, STEPS, pruning)[-1]["eval_loss"]

    study = optuna.create_study()
    with pytest.raises(RuntimeError, match="evaluation broke"):
        study.optimize(run, n_trials=1)
    assert states(study) == [FAIL]
    ridge_loop(run_dir=tmp_path / "run").close()  # not locked any more


# --- multi-objective studies --------------------------------------------------------------


def test_multi_objective_studies_keep_curves_and_are_never_pruned_by_the_pruner():
    def run(trial):
        pruning = OptunaPruning(trial, "eval_loss")
        loop = ridge_loop(trial.number, [pruning], inner_lr=10.0 if trial.number == 3 else None)
        last = run_trial(loop, STEPS, pruning)[-1]
        return last["eval_loss"], last["hypergrad_norm"]

    study = optuna.create_study(directions=["minimize", "minimize"],
                                pruner=optuna.pruners.ThresholdPruner(upper=0.1))
    study.optimize(run, n_trials=4)
    # trials 1, 2 would be pruned by the threshold (and 0 as well) in a single-objective study
    assert states(study) == [COMPLETE, COMPLETE, COMPLETE, PRUNED]
    for t in study.trials[:3]:
        assert t.intermediate_values == {}
        assert [s for s, _ in t.user_attrs["curve_eval_loss"]] == list(range(1, STEPS + 1))
    # a diverging run still ends pruned rather than failing the study
    assert "DivergenceError" in study.trials[3].user_attrs["prune_reason"]


# --- arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"every": 0}, "every must be an int >= 1, got 0"),
    ({"every": True}, "every must be an int >= 1, got True"),
    ({"every": 1.5}, "every must be an int >= 1"),
    ({"monitor": 3}, "monitor must be a record key"),
    ({"monitor": ""}, "monitor must be a record key"),
    ({"max_hypergrad_norm": -1.0}, "max_hypergrad_norm must be a positive number"),
    ({"max_hypergrad_norm": math.inf}, "max_hypergrad_norm must be a positive number"),
    ({"direction": "up"}, "direction must be one of"),
    ({"direction": "maximize"}, "direction='maximize' but the study is to minimize"),
    ({"trial": object()}, "trial must be an optuna Trial .* without report, should_prune"),
    ({"trial": optuna.create_study()}, "trial must be an optuna Trial"),
])
def test_bad_arguments_are_refused(kw, match):
    kw = {"trial": optuna.create_study().ask(), **kw}
    with pytest.raises(hg.BilevelInputError, match=match):
        OptunaPruning(**kw)


def test_good_arguments_and_trial_like_objects():
    study = optuna.create_study(direction="maximize")
    OptunaPruning(study.ask(), "eval_acc", direction="maximize")
    OptunaPruning(study.ask(), "eval_acc", direction=optuna.study.StudyDirection.MAXIMIZE)
    OptunaPruning(optuna.create_study(directions=["minimize", "maximize"]).ask(),
                  direction="maximize")
    fixed = optuna.trial.FixedTrial({})  # no study: never pruned, curve kept
    pruning = OptunaPruning(fixed, "outer_loss", every=2)
    run_trial(ridge_loop(callbacks=[pruning]), 4, pruning)
    assert fixed.user_attrs["curve_outer_loss"] == pruning.curve and len(pruning.curve) == 2


@pytest.mark.parametrize("monitor, kw, match", [
    ("eval_loss", {"evaluate": None, "eval_every": 0}, "is an evaluation metric but the "
                                                       "loop never evaluates"),
    ("eval_los", {}, r"'eval_los' is not among the loop's evaluation metrics \['eval_loss'\]"),
    ("outer_los", {}, r"'outer_los' is not in the loop's records, which hold \["),
    ("grid", {"metrics": lambda hp: {"grid": [1.0, 2.0]}}, "'grid' must be a number"),
])
def test_a_monitor_the_loop_does_not_record_is_an_error_at_the_first_step(monitor, kw, match):
    pruning = OptunaPruning(optuna.create_study().ask(), monitor)
    loop = ridge_loop(callbacks=[pruning], **kw)
    with pytest.raises(hg.BilevelInputError, match=match):
        run_trial(loop, STEPS, pruning)
    assert loop.global_step == 1


def test_run_trial_needs_the_loops_pruning_callback():
    trial = optuna.create_study().ask()
    pruning = OptunaPruning(trial)
    loop = ridge_loop()
    with pytest.raises(hg.BilevelInputError, match="not among the loop's callbacks"):
        run_trial(loop, STEPS, pruning)
    with pytest.raises(hg.BilevelInputError, match="needs the loop built with callbacks="):
        run_trial(loop, STEPS)
    with pytest.raises(hg.BilevelInputError, match="must be an OptunaPruning"):
        run_trial(loop, STEPS, object())
    two = ridge_loop(callbacks=[pruning, OptunaPruning(trial, "outer_loss")])
    with pytest.raises(hg.BilevelInputError, match="has 2 OptunaPruning callbacks"):
        run_trial(two, STEPS)
    assert loop.global_step == two.global_step == 0
    run_trial(ridge_loop(callbacks=[pruning]), 2)  # found among the callbacks
    assert list(reported(trial)) == [1, 2]

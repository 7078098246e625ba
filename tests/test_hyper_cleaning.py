"""Data hyper-cleaning (bilevel.cleaning): data preparation, metrics, the hypergradient with
respect to the per-example logits, argument errors and a tiny end-to-end hybrid search."""

from __future__ import annotations

import math
from dataclasses import replace

import optuna
import pytest
import torch

import hypergrad as hg
from bilevel import cleaning as C
from hypergrad.errors import BilevelInputError

sklearn_metrics = pytest.importorskip("sklearn.metrics")


pytestmark = pytest.mark.usefixtures("quiet_optuna")


@pytest.fixture(scope="module")
def digits() -> C.CleaningData:
    return C.load_cleaning_data("digits", 800, 200, noise=0.5, seed=3)


def small(seed: int = 0) -> C.CleaningData:
    return C.load_cleaning_data("digits", 100, 40, noise=0.5, seed=seed, n_test=100)


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("n,fraction,classes", [(800, 0.5, 10), (7, 0.3, 3), (50, 1.0, 2),
                                                (40, 0.0, 10)])
def test_flip_exact_fraction_and_always_another_class(n, fraction, classes):
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (n,), generator=gen)
    noisy, flipped = C.flip_labels(y, fraction, classes, gen)
    assert int(flipped.sum()) == round(fraction * n)
    assert torch.equal(noisy != y, flipped)  # every flipped label differs, no other changed
    assert noisy.dtype == torch.int64 and int(noisy.min()) >= 0 and int(noisy.max()) < classes


def test_flip_reaches_every_other_class():
    gen = torch.Generator().manual_seed(0)
    y = torch.zeros(3000, dtype=torch.int64)
    noisy, _ = C.flip_labels(y, 1.0, 4, gen)
    counts = torch.bincount(noisy, minlength=4)
    assert counts[0] == 0
    assert (counts[1:] > 850).all(), counts  # ~1000 each (uniform over the 3 others)


def test_stratified_split_sizes_disjoint_and_proportional():
    y = torch.arange(10).repeat_interleave(torch.tensor([50, 30, 20, 40, 60, 10, 90, 25,
                                                         35, 40]))
    gen = torch.Generator().manual_seed(0)
    parts = C.stratified_split(y, [120, 60, 80], gen)
    assert [p.numel() for p in parts] == [120, 60, 80]
    joined = torch.cat(parts)
    assert joined.unique().numel() == joined.numel()  # disjoint
    left = torch.bincount(y, minlength=10).double()
    for p, size in zip(parts, [120, 60, 80], strict=True):
        share = size * left / left.sum()
        counts = torch.bincount(y[p], minlength=10).double()
        assert ((counts - share).abs() < 1 + 1e-9).all(), (counts, share)
        left -= counts


def test_digits_task(digits):
    d = digits
    assert (d.x_train.shape, d.x_val.shape, d.x_test.shape) == ((800, 64), (200, 64),
                                                                 (797, 64))
    assert int(d.flipped.sum()) == 400
    assert torch.equal(d.y_train != d.y_true, d.flipped)
    for y, n in ((d.y_true, 800), (d.y_val, 200)):  # stratified: about n/10 per class
        assert (torch.bincount(y, minlength=10) - n * 0.1).abs().max() <= 0.1 * n * 0.15
    assert d.x_train.mean(0).abs().max() < 1e-5  # standardised on train
    again = C.load_cleaning_data("digits", 800, 200, noise=0.5, seed=3)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_train, d.y_train)
    other = C.load_cleaning_data("digits", 800, 200, noise=0.5, seed=4)
    assert not torch.equal(other.y_true, d.y_true)


# ---------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(4))
def test_flag_scores_match_sklearn(seed):
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.rand(200, generator=gen) < 0.5
    flags = torch.rand(200, generator=gen) < (0.3 + 0.4 * flipped.float())
    s = C.flag_scores(flags, flipped)
    args = (flipped.numpy(), flags.numpy())
    assert s["f1"] == pytest.approx(sklearn_metrics.f1_score(*args), abs=1e-12)
    assert s["precision"] == pytest.approx(sklearn_metrics.precision_score(*args), abs=1e-12)
    assert s["recall"] == pytest.approx(sklearn_metrics.recall_score(*args), abs=1e-12)


def test_flag_scores_empty_cases_follow_zero_division_0():
    none = torch.zeros(5, dtype=torch.bool)
    s = C.flag_scores(none, torch.tensor([True, False, True, False, False]))
    assert s == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert sklearn_metrics.f1_score([1, 0, 1, 0, 0], [0] * 5, zero_division=0) == 0.0


# ---------------------------------------------------------------------------- hypergradient


def test_hypergradient_wrt_example_logits_matches_finite_differences():
    """Unrolled (and truncated with a full window) reverse-mode hypergradients w.r.t. h in
    float64, against central differences with the library's FD error bars (truncation from
    steps eps/2·eps, rounding from the measured noise of h): no tuned tolerance."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    data = C.make_cleaning_data(x, y, 12, 8, noise=0.5, seed=0, num_classes=3)
    data = data.to(torch.float64)
    model = C.make_model("mlp", 5, 3, hidden=4, seed=0, dtype=torch.float64)
    mp = C.cleaning_problem(data, model, steps=15, inner_lr=0.3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(1)
    hparams = {"h": torch.randn(12, generator=gen, dtype=torch.float64)}
    for est in (hg.Unrolled(), hg.Truncated(window=15)):
        check = hg.check_hypergradient(mp.problem, hparams, mp.params, est,
                                       coords=list(range(12)), eps=1e-4)
        assert check.agrees, check.verdict
    # the equal-weights start of every run (h = 0) gives a finite hypergradient too
    grad = mp.hypergradient(hg.Unrolled(), hparams={"h": torch.zeros(12, dtype=torch.float64)}
                            ).grad["h"]
    assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call,match", [
    (lambda: C.flip_labels(torch.zeros(4, dtype=torch.int64), 1.5, 3,
                           torch.Generator()), "fraction"),
    (lambda: C.flip_labels(torch.zeros(4), 0.5, 3, torch.Generator()), "labels"),
    (lambda: C.flip_labels(torch.full((4,), 5), 0.5, 3, torch.Generator()), "labels"),
    (lambda: C.flip_labels(torch.zeros(4, dtype=torch.int64), 0.5, 1, torch.Generator()),
     "num_classes"),
    (lambda: C.stratified_split(torch.zeros(5, dtype=torch.int64), [3, 3],
                                torch.Generator()), "sizes"),
    (lambda: C.stratified_split(torch.zeros(5, dtype=torch.int64), [-1],
                                torch.Generator()), r"sizes\[0\]"),
    (lambda: C.load_cleaning_data("mnist"), "dataset"),
    (lambda: C.load_cleaning_data("digits", 1500, 400), "n_train"),
    (lambda: C.make_cleaning_data(torch.zeros(5, 2), torch.zeros(4, dtype=torch.int64), 2, 1),
     "labels"),
    (lambda: C.make_model("cnn", 4, 2), "model"),
    (lambda: C.CleaningConfig(estimator="lvhba"), "estimator"),
    (lambda: C.CleaningConfig(steps=0), "steps"),
    (lambda: C.CleaningConfig(outer_lr=-1.0), "outer_lr"),
    (lambda: C.CleaningConfig(inner_lr=float("nan")), "inner_lr"),
    (lambda: C.CleaningConfig(init_logit=float("inf")), "init_logit"),
    (lambda: C.flag_scores(torch.zeros(3, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)),
     "shape"),
    (lambda: C.flag_scores(torch.zeros(3), torch.zeros(3, dtype=torch.bool)), "flags"),
])
def test_argument_errors_name_the_argument(call, match):
    with pytest.raises(BilevelInputError, match=match):
        call()


def test_search_and_run_argument_errors():
    d = small()
    with pytest.raises(BilevelInputError, match="budget_seconds, n_trials"):
        C.hybrid(d, budget_seconds=None, n_trials=None)
    with pytest.raises(BilevelInputError, match="n_trials"):
        C.optuna_alone(d, budget_seconds=None, n_trials=0)
    with pytest.raises(BilevelInputError, match="select"):
        C.run_cleaning(d, C.CleaningConfig(outer_steps=1), select=(d.x_val, d.y_val[:3]))
    with pytest.raises(BilevelInputError, match="fraction"):
        C.split_selection(d, 1.0)
    with pytest.raises(BilevelInputError, match="inner_lr"):
        C.cleaning_problem(d, C.make_model("linear", 64, 10), 5, 0.0)


def test_select_recipe_picks_the_lowest_cross_validated_loss():
    d = small(3)
    base = C.FitRecipe(steps=30)
    recipe, scores = C.select_recipe(d, None, hidden=8, seed=3, base=base, grid=(1e-3, 1.0))
    assert set(scores) == {1e-3, 1.0} and all(math.isfinite(v) for v in scores.values())
    assert recipe.weight_decay == min(scores, key=scores.get)
    assert (recipe.steps, recipe.lr) == (base.steps, base.lr)
    with pytest.raises(BilevelInputError, match="grid"):
        C.select_recipe(d, None, grid=())


# ---------------------------------------------------------------------------- end to end


def test_tiny_hybrid_run_gives_finite_numbers(monkeypatch):
    monkeypatch.setitem(C.HYBRID_SPACE, "steps", (3, 5))
    d = small(1)
    base = C.CleaningConfig(outer_steps=4, hidden=16)
    r = C.hybrid(d, budget_seconds=None, n_trials=2, base=base, seed=1,
                 recipe=C.FitRecipe(steps=20))
    assert r.trials is not None and sum(r.trials.values()) == 2
    assert r.params["estimator"] in C.CLEANING_ESTIMATORS
    assert r.params["steps"] in (3, 5)
    for v in (r.test_acc, r.test_acc_train_only, r.f1, r.precision, r.recall, r.val_loss):
        assert v is not None and math.isfinite(v)
    assert 0.0 <= r.test_acc <= 1.0 and 0.0 <= r.f1 <= 1.0
    # σ(h) in [0, 1]: float32 saturates at 0 or 1 once |h| > ~17 (e.g. from a detector start)
    assert r.weights.shape == (100,) and ((r.weights >= 0) & (r.weights <= 1)).all()
    assert r.params["h_init"] in C.H_INITS
    summary = r.summary()
    assert "weights" not in summary and summary["method"].startswith("hybrid")

    alone = C.optuna_alone(d, budget_seconds=None, n_trials=2, hidden=16, seed=1, steps=20)
    assert math.isfinite(alone.test_acc) and alone.f1 is None
    assert set(alone.params) == {"lr", "weight_decay", "final_weight_decay"}
    assert alone.params["final_weight_decay"] == alone.params["weight_decay"]


def test_fixed_run_lowers_flipped_weights():
    """A short unrolled run already separates the flipped examples somewhat."""
    d = small(2)
    run = C.run_cleaning(d, C.CleaningConfig(steps=10, outer_steps=15, hidden=16, outer_lr=2.0))
    assert len(run.history) == 15 and math.isfinite(run.val_loss)
    assert run.weights[d.flipped].mean() < run.weights[~d.flipped].mean() - 0.1


def test_cold_start_and_selection_split():
    """warm_start=False restarts every inner run; with a selection split the kept weights are
    those of the outer step with the lowest held-out loss."""
    d = small(4)
    outer, select = C.split_selection(d, 0.5, seed=4)
    assert outer.y_val.numel() + select[1].numel() == d.y_val.numel() == 40
    run = C.run_cleaning(outer, C.CleaningConfig(steps=5, outer_steps=6, hidden=8,
                                                 warm_start=False), select=select)
    curve = [r["eval_select_loss"] for r in run.history]
    assert run.select_loss == pytest.approx(min(curve))
    assert run.best_step == curve.index(min(curve))
    assert torch.isfinite(run.weights).all()


def test_disagreement_weights_are_binary_test_blind_and_flag_flips():
    """The validation-classifier detector: 0/1 weights, the validation-set-alone classifier's
    agreement with the training labels, computed without the test split or the flip labels."""
    d = small(5)
    weights, recipe = C.disagreement_weights(d, hidden=16, seed=5)
    assert weights.shape == (100,) and set(weights.unique().tolist()) <= {0.0, 1.0}
    assert recipe.weight_decay in C.FINAL_WEIGHT_DECAYS
    # other test labels and features, other flip labels: the same weights
    gen = torch.Generator().manual_seed(0)
    blind = replace(d, y_test=(d.y_test + 1) % d.num_classes,
                    x_test=torch.randn(d.x_test.shape, generator=gen),
                    y_true=d.y_train.clone(), flipped=torch.zeros_like(d.flipped))
    again, again_recipe = C.disagreement_weights(blind, hidden=16, seed=5)
    assert torch.equal(again, weights) and again_recipe == recipe
    # flipped examples are flagged (weight 0) far more often than clean ones
    flag = weights < C.THRESHOLD
    assert flag[d.flipped].float().mean() > flag[~d.flipped].float().mean() + 0.3

    r = C.disagreement(d, hidden=16, seed=5, recipe=C.FitRecipe(steps=20))
    assert r.method == "validation-classifier disagreement"
    assert torch.equal(r.weights, weights)
    assert r.params["flagged"] == int(flag.sum())
    scores = C.flag_scores(flag, d.flipped)
    assert (r.precision, r.recall, r.f1) == (scores["precision"], scores["recall"],
                                             scores["f1"])
    assert r.test_acc_train_only is not None and 0.0 <= r.test_acc <= 1.0


def test_detector_start_signs_and_test_blind():
    """The detector start of h: +c where the validation-split classifier agrees with the
    training label, −c where it disagrees; computed without the test split or flip labels."""
    d = small(6)
    agree, _ = C.disagreement_weights(d, hidden=16, seed=6)
    h0 = C.detector_logits(agree, 1.5)
    assert torch.equal(h0 > 0, agree == 1) and torch.equal(h0.abs(), torch.full((100,), 1.5,
                                                                                  dtype=h0.dtype))
    assert torch.equal(torch.sigmoid(h0) < C.THRESHOLD, agree == 0)  # starts on the detector
    gen = torch.Generator().manual_seed(1)
    blind = replace(d, y_test=(d.y_test + 3) % d.num_classes,
                    x_test=torch.randn(d.x_test.shape, generator=gen),
                    y_true=d.y_train.clone(), flipped=torch.zeros_like(d.flipped))
    again, _ = C.disagreement_weights(blind, hidden=16, seed=6)
    assert torch.equal(C.detector_logits(again, 1.5), h0)
    # run_cleaning starts there: with a tiny outer rate the kept weights stay on the start
    config = C.CleaningConfig(steps=3, outer_steps=1, hidden=16, outer_lr=1e-9,
                              h_init="detector", detector_scale=1.5)
    for data in (d, blind):
        run = C.run_cleaning(data, config, seed=6)
        assert torch.allclose(run.weights, torch.sigmoid(h0), atol=1e-5)
    # the problem takes a tensor start; bad starts and scales are refused
    mp = C.cleaning_problem(d, C.make_model("linear", 64, 10), 2, 0.1, init_logit=h0)
    assert torch.equal(mp.hparams["h"], h0)
    with pytest.raises(BilevelInputError, match="init_logit"):
        C.cleaning_problem(d, C.make_model("linear", 64, 10), 2, 0.1, init_logit=h0[:5])
    with pytest.raises(BilevelInputError, match="scale"):
        C.detector_logits(agree, 0.0)
    with pytest.raises(BilevelInputError, match="agreement"):
        C.detector_logits(agree * 0.5, 1.0)
    with pytest.raises(BilevelInputError, match="h_init"):
        C.CleaningConfig(h_init="oracle")
    with pytest.raises(BilevelInputError, match="detector_scale"):
        C.CleaningConfig(detector_scale=-1.0)


def test_tiny_hybrid_draws_the_start_of_h(monkeypatch):
    """Both starts drawn in one tiny search (the first trials sample independently); the
    detector is fitted on the hypergradient half of the validation split only."""
    monkeypatch.setitem(C.HYBRID_SPACE, "steps", (3,))
    d = small(7)
    seen = []
    real = C.disagreement_weights

    def spy(data, *args, **kwargs):
        seen.append(data.y_val.numel())
        return real(data, *args, **kwargs)

    monkeypatch.setattr(C, "disagreement_weights", spy)
    chosen = []
    r = C.hybrid(d, budget_seconds=None, n_trials=6, base=C.CleaningConfig(outer_steps=3,
                                                                          hidden=8),
                 seed=7, recipe=C.FitRecipe(steps=10),
                 pruner=optuna.pruners.NopPruner(),
                 callback=lambda study, trial: chosen.append(trial.params))
    assert seen == [20]  # once, on the 20 hypergradient examples of the 40
    assert {p["h_init"] for p in chosen} == set(C.H_INITS)
    for p in chosen:
        assert ("detector_scale" in p) == (p["h_init"] == "detector")
        if "detector_scale" in p:
            assert 0.5 <= p["detector_scale"] <= 4.0
    assert r.params["h_init"] in C.H_INITS and math.isfinite(r.test_acc)
    assert r.weights.shape == (100,) and torch.isfinite(r.weights).all()

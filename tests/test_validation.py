"""Bad input gets a clear error, raised before any work, naming what is wrong."""

from __future__ import annotations

import pytest
import torch

import hypergrad as hg

from problems import DT, Ridge


@pytest.fixture()
def ridge() -> Ridge:
    return Ridge.make(n=20, d=4, nv=10)


def _call(ridge, hparams=None, params=None, **problem_kw):
    fields = dict(inner_loss=ridge.inner_loss, outer_loss=ridge.outer_loss,
                  inner_batch=(ridge.X, ridge.y), outer_batch=(ridge.Xv, ridge.yv), steps=5)
    fields.update(problem_kw)
    problem = hg.Problem(**fields)
    return hg.hypergradient(problem, ridge.hparams() if hparams is None else hparams,
                            ridge.params0() if params is None else params, "unrolled")


def test_valid_input_passes(ridge):
    out = _call(ridge)
    assert out.grad["lam"].shape == (4,)


@pytest.mark.parametrize("hparams, match", [
    ({"lam": 0.5}, r"hparams\['lam'\] must be a floating-point torch.Tensor, got float"),
    ({"lam": torch.arange(4)}, r"hparams\['lam'\] must be a floating-point tensor, got dtype "
                               r"torch.int64"),
    ({}, "non-empty"),
    ({"lam": torch.full((4,), float("nan"), dtype=DT)}, r"hparams\['lam'\] contains NaN"),
])
def test_hyperparameters_of_the_wrong_type(ridge, hparams, match):
    with pytest.raises((hg.HyperparameterError, hg.NonFiniteError), match=match):
        _call(ridge, hparams=hparams)


def test_hyperparameters_with_another_structure_than_the_objective_reads(ridge):
    with pytest.raises(hg.HyperparameterError, match=r"KeyError.*'lam'.*hparams keys: \['l2'\]"):
        _call(ridge, hparams={"l2": ridge.lam.clone()})


def test_unused_hyperparameter_is_named(ridge):
    hparams = {"lam": ridge.lam.clone(), "extra": torch.zeros(2, dtype=DT)}
    with pytest.raises(hg.HyperparameterError, match=r"hparams\['extra'\] is not read"):
        _call(ridge, hparams=hparams)


def test_hyperparameter_read_only_by_an_optimizer_setting_is_used(ridge):
    hparams = {"lam": ridge.lam.clone(), "log_lr": torch.tensor(-2.0, dtype=DT)}
    out = _call(ridge, hparams=hparams, optimizer=hg.SGD(lr=lambda h: h["log_lr"].exp()))
    assert float(out.grad["log_lr"].abs()) > 0


def test_objective_that_does_not_depend_on_hyperparameters(ridge):
    def inner(p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.0 * h["lam"].detach().sum()

    with pytest.raises(hg.HyperparameterError, match="identically zero"):
        _call(ridge, inner_loss=inner)


def test_zero_hypergradient_warns(ridge):
    def inner(p, h, batch):
        X, y = batch
        return 0.5 * ((X @ p["w"] - y) ** 2).mean() + 0.0 * h["lam"].sum()

    with pytest.warns(RuntimeWarning, match="exactly zero"):
        _call(ridge, inner_loss=inner)


def test_non_scalar_objective(ridge):
    with pytest.raises(hg.ObjectiveError, match=r"outer_loss must return a scalar.*shape \(10,\)"):
        _call(ridge, outer_loss=lambda p, h, b: (b[0] @ p["w"] - b[1]) ** 2)
    with pytest.raises(hg.ObjectiveError, match="inner_loss must return a scalar tensor, got fl"):
        _call(ridge, inner_loss=lambda p, h, b: 1.0)


def test_non_finite_loss(ridge):
    with pytest.raises(hg.NonFiniteError, match="outer_loss is inf"):
        _call(ridge, outer_loss=lambda p, h, b: (p["w"] * h["lam"]).sum() + float("inf"))


def test_non_finite_hypergradient_is_caught(ridge):
    with pytest.raises(hg.NonFiniteError, match=r"hypergradient\['lam'\] contains NaN or inf"):
        _call(ridge, optimizer=hg.SGD(lr=1e3), steps=400)


def test_dtype_mismatch_names_the_tensor(ridge):
    with pytest.raises(hg.BilevelInputError, match=r"hparams\['lam'\] has dtype torch.float32"):
        _call(ridge, hparams={"lam": ridge.lam.float()})
    with pytest.raises(hg.BilevelInputError, match=r"outer_batch\[0\] has dtype torch.float32"):
        _call(ridge, outer_batch=(ridge.Xv.float(), ridge.yv))


def test_shape_mismatch_between_params_and_data(ridge):
    with pytest.raises(hg.ObjectiveError, match="inner_loss.*failed"):
        _call(ridge, params={"w": torch.zeros(5, dtype=DT)})


def test_device_mismatch_names_the_tensor(ridge):
    meta = {"lam": ridge.lam.to("meta")}
    with pytest.raises(hg.BilevelInputError, match=r"hparams\['lam'\] is on meta"):
        _call(ridge, hparams=meta)


def test_problem_and_estimator_settings_are_checked(ridge):
    with pytest.raises(ValueError, match="steps must be a non-negative int"):
        hg.Problem(ridge.inner_loss, ridge.outer_loss, steps=-1)
    with pytest.raises(TypeError, match="inner_loss must be callable"):
        hg.Problem("loss", ridge.outer_loss)
    with pytest.raises(ValueError, match="window must be a positive int"):
        hg.Truncated(window=0)
    with pytest.raises(ValueError, match="unknown estimator 'implict'"):
        _ = hg.make_estimator("implict")
    with pytest.raises(TypeError, match="linear solver"):
        hg.Implicit(solver="cg")


def test_hypergradient_validates_once_per_problem_and_layout(monkeypatch):
    """hg.hypergradient(check=True) runs check_problem on the first call for a problem
    object, and again only for a new problem or a new layout of hparams/params."""
    import hypergrad.validation as validation

    calls = []
    real = validation.check_problem
    monkeypatch.setattr(validation, "check_problem",
                        lambda *a: (calls.append(1), real(*a))[1])
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)

    def inner(w, h, b):
        return ((w["w"] - x) ** 2).sum() + (h["l2"] * w["w"] ** 2).sum()

    def outer(w, h, b):
        return (w["w"] ** 2).sum()

    def make():
        return hg.Problem(inner, outer, optimizer=hg.SGD(lr=0.1), steps=5)

    problem, w = make(), {"w": torch.zeros(8, dtype=torch.float64)}
    for value in (0.1, 0.2, 0.3):
        hg.hypergradient(problem, {"l2": torch.tensor(value, dtype=torch.float64)}, w,
                         "unrolled")
    assert len(calls) == 1
    hg.hypergradient(problem, {"l2": torch.full((8,), 0.1, dtype=torch.float64)}, w,
                     "unrolled")  # a new shape of the hyperparameter
    assert len(calls) == 2
    hg.hypergradient(make(), {"l2": torch.tensor(0.1, dtype=torch.float64)}, w, "unrolled")
    assert len(calls) == 3
    with pytest.raises(hg.HyperparameterError):  # a new problem, an unread hyperparameter
        hg.hypergradient(make(), {"l2": torch.tensor(0.1, dtype=torch.float64),
                                  "unused": torch.tensor(1.0, dtype=torch.float64)}, w)

"""The ``[search]`` table of ``bilevel tune``: parsing, checks, suggestions, TOML output."""

import copy
import math
from pathlib import Path

import optuna
import pytest

import hypergrad as hg
from bilevel.config import ConfigError, parse_config, tomllib
from bilevel.tune import (
    UNSEARCHABLE,
    SearchSpace,
    apply,
    build_config,
    split_search,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def example(name: str = "digits_mlp") -> dict:
    with open(ROOT / "examples" / "configs" / f"{name}.toml", "rb") as f:
        return tomllib.load(f)


MLP = example()
CONVNET = example("digits_convnet")

SEARCH = """
"inner.steps" = { int = [10, 100], step = 10 }
"outer.lr" = { float = [1e-3, 1e-1], log = true }
"estimator.name" = { categorical = ["truncated", "implicit"] }
"estimator.settings.window" = { int = [5, 40] }
"model.sizes[0]" = { int = [16, 128], log = true }
"inner.optimizer" = { categorical = ["sgd", "adam"] }
"hyperparameters.lr" = { float = [0.01, 0.5], log = true }
"""


def space(text: str = SEARCH, config: dict = MLP) -> SearchSpace:
    return SearchSpace.from_table(tomllib.loads(text), config)


def error(text: str, config: dict = MLP) -> str:
    with pytest.raises(ConfigError) as info:
        space(text, config)
    return str(info.value)


# -- parsing -------------------------------------------------------------------------------

def test_parse_example_space():
    s = space()
    assert len(s) == 7
    # estimator settings come last: they depend on the drawn estimator.name
    assert s.paths[-1] == "estimator.settings.window"
    by = {spec.path: spec for spec in s}
    assert by["inner.steps"].kind == "int" and by["inner.steps"].step == 10
    assert by["outer.lr"].log and by["outer.lr"].low == 1e-3
    assert by["estimator.settings.window"].estimators == ("truncated",)
    assert by["estimator.name"].choices == ("truncated", "implicit")


def test_unquoted_dotted_keys_are_the_same_paths():
    nested = space('inner.steps = { int = [10, 20] }\n"outer.lr" = { float = [0.01, 0.1] }')
    assert nested.paths == ("inner.steps", "outer.lr")


def test_split_search_and_document_round_trip():
    doc = {**copy.deepcopy(MLP), "search": tomllib.loads(SEARCH)}
    config, table = split_search(doc)
    assert "search" not in config and config == MLP
    assert SearchSpace.from_table(table, config).paths == space().paths
    assert split_search(MLP) == (MLP, {})
    with pytest.raises(ConfigError, match="^search: expected a table"):
        split_search({**MLP, "search": 3})


def test_an_invalid_base_config_is_reported_as_is():
    bad = copy.deepcopy(MLP)
    bad["outer"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="^outer.lr: expected float"):
        SearchSpace.from_table({}, bad)


# -- every validation error names the key ----------------------------------------------------

@pytest.mark.parametrize("text, key, message", [
    # unknown keys
    ('"inner.stepz" = { int = [1, 2] }', "inner.stepz", "unknown key"),
    ('"nope" = { int = [1, 2] }', "nope", "unknown key"),
    ('"outer.lr.x" = { int = [1, 2] }', "outer.lr.x", "not a table"),
    ('"model.width" = { int = [1, 2] }', "model.width", "unknown key"),  # an MLP config
    ('"estimator.settings.cg_iters" = { int = [1, 2] }', "estimator.settings.cg_iters",
     "no estimator of ['unrolled'] takes"),
    ('"estimator.settings.window.x" = { int = [1, 2] }', "estimator.settings.window.x",
     "unknown key"),
    ('"outer lr" = { float = [1, 2] }', "outer lr", "dotted config key path"),
    # tables, arrays
    ('"inner" = { int = [1, 2] }', "inner", "a table"),
    ('"estimator.settings" = { categorical = [1] }', "estimator.settings", "a table"),
    ('"model.sizes" = { int = [1, 2] }', "model.sizes",
     'search its elements, e.g. "model.sizes[0]"'),
    ('"model.sizes[1]" = { int = [1, 2] }', "model.sizes[1]", "out of range"),
    ('"outer.lr[0]" = { float = [1, 2] }', "outer.lr[0]", "not an array"),
    # spec shape
    ('"outer.lr" = 0.1', "outer.lr", "expected a spec table"),
    ('"outer.lr" = { float = [1e-3, 1e-1], lgo = true }', "outer.lr",
     "unknown spec field(s) 'lgo'"),
    ('"outer.lr" = { log = true }', "outer.lr", "exactly one of int, float, categorical, got none"),
    ('"outer.lr" = { float = [0.1, 1.0], categorical = [0.1] }', "outer.lr",
     "got float, categorical"),
    ('"outer.lr" = { float = [0.1] }', "outer.lr", "expected [low, high]"),
    ('"outer.lr" = { float = 0.1 }', "outer.lr", "expected [low, high]"),
    # bounds
    ('"outer.lr" = { float = [0.5, 0.1] }', "outer.lr", "low > high"),
    ('"inner.steps" = { int = [50, 10] }', "inner.steps", "low > high"),
    ('"outer.lr" = { float = [0.0, 0.1], log = true }', "outer.lr", "log = true needs low > 0"),
    ('"outer.lr" = { float = [-1.0, 0.1], log = true }', "outer.lr", "log = true needs low > 0"),
    ('"inner.steps" = { int = [0, 10], log = true }', "inner.steps", "log = true needs low > 0"),
    ('"outer.lr" = { float = [0.01, 0.1], log = 1 }', "outer.lr", "log: expected a boolean"),
    ('"inner.steps" = { int = [1.5, 10] }', "inner.steps", "low: expected an integer"),
    ('"inner.steps" = { int = [1, 10.0] }', "inner.steps", "high: expected an integer"),
    ('"inner.steps" = { int = [true, 10] }', "inner.steps", "low: expected an integer"),
    ('"outer.lr" = { float = ["a", 0.1] }', "outer.lr", "low: expected a number"),
    ('"outer.lr" = { float = [0.01, inf] }', "outer.lr", "high: expected a finite number"),
    # step
    ('"inner.steps" = { int = [10, 100], step = 0 }', "inner.steps", "step: expected a positive"),
    ('"inner.steps" = { int = [10, 100], step = -10 }', "inner.steps", "step: expected a positive"),
    ('"inner.steps" = { int = [10, 100], step = 2.5 }', "inner.steps", "step: expected an integer"),
    ('"inner.steps" = { int = [10, 100], step = 10, log = true }', "inner.steps",
     "step and log = true cannot be combined"),
    ('"inner.steps" = { int = [10, 95], step = 10 }', "inner.steps", "not a multiple of step"),
    ('"outer.lr" = { float = [0.01, 0.1], step = 0.04 }', "outer.lr", "not a multiple of step"),
    # categorical
    ('"inner.optimizer" = { categorical = [] }', "inner.optimizer", "non-empty array"),
    ('"inner.optimizer" = { categorical = "sgd" }', "inner.optimizer", "non-empty array"),
    ('"inner.optimizer" = { categorical = ["sgd", "sgd"] }', "inner.optimizer", "given twice"),
    ('"inner.optimizer" = { categorical = ["sgd", ["adam"]] }', "inner.optimizer",
     "strings, numbers or booleans"),
    ('"inner.optimizer" = { categorical = ["sgd"], log = true }', "inner.optimizer",
     "log and step apply to int and float"),
    ('"inner.steps" = { categorical = [10, "20"] }', "inner.steps",
     "choice = '20' is not a valid config value: inner.steps: expected integer"),
    ('"inner.optimizer" = { categorical = ["sgd", "sgdd"] }', "inner.optimizer",
     "choice = 'sgdd' is not a valid config value: inner.optimizer: expected one of"),
    ('"inner.reinit" = { categorical = [true, 1] }', "inner.reinit", "expected boolean"),
    ('"estimator.name" = { categorical = ["unrolled", "soba"] }', "estimator.name",
     "choice = 'soba'"),
    # the kind of spec must fit the key's type
    ('"outer.lr" = { int = [1, 2] }', "outer.lr", "int needs an integer key"),
    ('"inner.steps" = { float = [1, 2] }', "inner.steps", "float needs a float key"),
    ('"inner.optimizer" = { int = [1, 2] }', "inner.optimizer", "use categorical"),
    ('"inner.reinit" = { int = [0, 1] }', "inner.reinit", "use categorical"),
    # ranges the config allows
    ('"inner.steps" = { int = [0, 10] }', "inner.steps",
     "low = 0 is not a valid config value: inner.steps: expected a positive number"),
    ('"outer.lr" = { float = [0.0, 0.1] }', "outer.lr", "low = 0.0 is not a valid"),
    ('"model.sizes[0]" = { int = [0, 8] }', "model.sizes[0]", "model.sizes: expected a non-empty"),
    ('"hyperparameters.weight_decay" = { float = [-1.0, 1.0] }', "hyperparameters.weight_decay",
     "low = -1.0"),
])
def test_validation_errors_name_the_key(text, key, message):
    msg = error(text)
    assert msg.startswith(f'search."{key}": '), msg
    assert message in msg, msg


def test_errors_on_the_convnet_schema():
    msg = error('"model.depth" = { int = [1, 4] }', CONVNET)
    assert msg.startswith('search."model.depth": high = 4 is not a valid config value: '
                          "model.depth: digits images are 8x8"), msg
    msg = error('"model.norm" = { categorical = ["instance", "batch"] }', CONVNET)
    assert "choice = 'batch'" in msg
    msg = error('"model.sizes[0]" = { int = [1, 4] }', CONVNET)
    assert "unknown key" in msg
    assert len(space('"model.width" = { int = [4, 16], log = true }', CONVNET)) == 1


@pytest.mark.parametrize("key", [
    "data.limit", "data.dataset", "data.seed", "output.dir", "device", "dtype", "seed",
    "hyperparameters.tune", "model.kind", "outer.checkpoint_every", "outer.eval_every",
    "estimator.settings.self_check",
])
def test_unsearchable_keys(key):
    msg = error(f'"{key}" = {{ categorical = [1] }}')
    assert msg.startswith(f'search."{key}": cannot be searched ('), msg


def test_unsearchable_reasons_and_seed_settings():
    assert set(UNSEARCHABLE) >= {"data", "output", "device", "dtype", "seed"}
    config = copy.deepcopy(MLP)
    config["estimator"] = {"name": "truncated", "settings": {"window": 10}}
    msg = error('"estimator.settings.seed" = { int = [0, 9] }', config)
    assert "a seed is not a setting" in msg
    # a setting TOML cannot write (a preconditioner: a function)
    config["estimator"] = {"name": "implicit"}
    msg = error('"estimator.settings.solver.preconditioner" = { categorical = ["x"] }', config)
    assert "its value cannot be written in TOML" in msg


def test_key_given_twice():
    msg = error('"inner.steps" = { int = [1, 2] }\n[inner]\nsteps = { int = [1, 3] }')
    assert msg.startswith('search."inner.steps": given twice')


def test_estimator_settings_follow_the_candidate_estimators():
    # window is a setting of truncated only: with estimator.name fixed to unrolled it is unknown
    assert "no estimator of ['unrolled'] takes a setting 'window'" in error(
        '"estimator.settings.window" = { int = [5, 10] }')
    # each bound is checked with every estimator that takes the setting
    msg = error('"estimator.name" = { categorical = ["truncated", "random_window", "implicit"] }'
                '\n"estimator.settings.window" = { int = [0, 10] }')
    assert msg.startswith('search."estimator.settings.window": low = 0 with estimator.name = '
                          "'truncated' is not a valid config value: estimator.settings:"), msg
    s = space('"estimator.name" = { categorical = ["truncated", "random_window", "implicit"] }'
              '\n"estimator.settings.window" = { int = [2, 10] }'
              '\n"estimator.settings.inner_tol" = { float = [1e-6, 1e-2], log = true }')
    by = {spec.path: spec for spec in s}
    assert by["estimator.settings.window"].estimators == ("truncated", "random_window")
    assert by["estimator.settings.inner_tol"].estimators == ("implicit",)


# -- suggestions ---------------------------------------------------------------------------

def test_suggest_with_fixed_trial():
    s = space()
    params = {"inner.steps": 30, "outer.lr": 0.01, "estimator.name": "truncated",
              "estimator.settings.window": 7, "model.sizes[0]": 32, "inner.optimizer": "adam",
              "hyperparameters.lr": 0.1}
    assert s.suggest(optuna.trial.FixedTrial(params)) == params
    # an implicit trial draws no window (FixedTrial would raise on an unknown parameter)
    params = {k: v for k, v in params.items() if k != "estimator.settings.window"}
    params["estimator.name"] = "implicit"
    assert s.suggest(optuna.trial.FixedTrial(params)) == params


def test_suggest_with_a_study_respects_ranges_log_and_step():
    s = space()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_estimators = set()
    for _ in range(40):
        trial = study.ask()
        values = s.suggest(trial)
        assert set(values) == set(trial.params)
        assert type(values["inner.steps"]) is int and values["inner.steps"] % 10 == 0
        assert 10 <= values["inner.steps"] <= 100
        assert 1e-3 <= values["outer.lr"] <= 1e-1
        assert type(values["model.sizes[0]"]) is int and 16 <= values["model.sizes[0]"] <= 128
        assert values["inner.optimizer"] in ("sgd", "adam")
        seen_estimators.add(values["estimator.name"])
        assert ("estimator.settings.window" in values) == (values["estimator.name"] == "truncated")
        document, cfg = build_config(MLP, values)
        assert cfg.inner.steps == values["inner.steps"]
        assert cfg.model.sizes == [values["model.sizes[0]"]]
        assert cfg.estimator.name == values["estimator.name"]
        study.tell(trial, values["outer.lr"])
    assert seen_estimators == {"truncated", "implicit"}
    dists = study.trials[0].distributions
    assert dists["outer.lr"].log and dists["inner.steps"].step == 10
    # the log scale: a log-uniform draw falls below the middle of its range most of the time
    lrs = [t.params["outer.lr"] for t in study.trials]
    assert sum(lr < 0.05 for lr in lrs) > 0.7 * len(lrs)


def test_to_distributions_enqueue_and_create_trial():
    s = space()
    dists = s.to_distributions()
    assert list(dists) == list(s.paths)
    assert isinstance(dists["outer.lr"], optuna.distributions.FloatDistribution)
    assert dists["outer.lr"].log and dists["inner.steps"].step == 10
    assert dists["estimator.name"].choices == ("truncated", "implicit")
    params = {"inner.steps": 20, "outer.lr": 0.02, "estimator.name": "truncated",
              "estimator.settings.window": 9, "model.sizes[0]": 64, "inner.optimizer": "sgd",
              "hyperparameters.lr": 0.05}
    frozen = optuna.trial.create_trial(params=params, distributions=dists, value=0.5)
    study = optuna.create_study()
    study.add_trial(frozen)
    assert study.best_params == params
    study.enqueue_trial(params)
    assert s.suggest(study.ask()) == params


def test_float_step():
    s = space('"hyperparameters.weight_decay" = { float = [0.001, 0.011], step = 0.002 }')
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        v = s.suggest(study.ask())["hyperparameters.weight_decay"]
        k = (v - 0.001) / 0.002
        assert math.isclose(k, round(k), abs_tol=1e-6) and 0.001 <= v <= 0.011 + 1e-12


# -- apply and the config check ----------------------------------------------------------------

def test_apply_leaves_the_original_untouched():
    before = copy.deepcopy(MLP)
    out = apply(MLP, {"model.sizes[0]": 99, "inner.momentum": 0.5, "outer.lr": 0.3})
    assert MLP == before
    assert out["model"]["sizes"] == [99] and MLP["model"]["sizes"] == [64]
    assert out["inner"]["momentum"] == 0.5  # a key the base config left at its default
    assert out["outer"]["lr"] == 0.3
    parse_config(out)


def test_apply_creates_settings_and_drops_those_the_new_estimator_does_not_take():
    base = copy.deepcopy(MLP)
    del base["estimator"]["settings"]
    out = apply(base, {"estimator.name": "truncated", "estimator.settings.window": 5})
    assert out["estimator"] == {"name": "truncated", "settings": {"window": 5}}
    base["estimator"] = {"name": "truncated", "settings": {"window": 20, "mode": "reverse"}}
    out = apply(base, {"estimator.name": "implicit"})
    assert out["estimator"]["settings"] == {}
    out = apply(base, {"estimator.name": "unrolled"})
    assert out["estimator"]["settings"] == {"mode": "reverse"}
    assert parse_config(out).estimator.name == "unrolled"
    # the base keeps its settings
    assert base["estimator"]["settings"] == {"window": 20, "mode": "reverse"}


def test_build_config_names_the_trials_values():
    s = space('"estimator.settings.mode" = { categorical = ["reverse", "forward"] }\n'
              '"estimator.settings.recompute" = { categorical = [false, true] }')
    values = s.suggest(optuna.trial.FixedTrial({"estimator.settings.mode": "forward",
                                                "estimator.settings.recompute": True}))
    with pytest.raises(ConfigError) as info:
        build_config(MLP, values)
    msg = str(info.value)
    assert msg.startswith("search: the trial's values (estimator.settings.mode = 'forward', "
                          "estimator.settings.recompute = True) make an invalid config: "
                          "estimator.settings: invalid for 'unrolled'"), msg
    document, cfg = build_config(MLP, {"estimator.settings.mode": "forward"})
    assert cfg.estimator.settings == {"mode": "forward"}


# -- TOML output --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["digits_mlp", "digits_convnet"])
def test_toml_round_trip_of_the_examples(name):
    config = example(name)
    assert tomllib.loads(to_toml(config)) == config
    values = {"inner.steps": 40, "outer.lr": 0.0123456789, "estimator.name": "truncated",
              "estimator.settings.window": 7, "hyperparameters.weight_decay": 1e-5}
    document, cfg = build_config(config, values)
    text = to_toml(document, header="bilevel tune: best trial 3\nvalue 0.97")
    assert text.startswith("# bilevel tune: best trial 3\n# value 0.97\n")
    assert tomllib.loads(text) == document
    again = parse_config(tomllib.loads(text))
    assert again == cfg
    assert again.estimator.settings == {"window": 7} and again.outer.lr == 0.0123456789


def test_toml_writer_value_types():
    doc = {"s": 'quote " back \\ newline \n tab \t del \x7f é', "i": -3, "big": 2 ** 62,
           "f": 1e-300, "g": 1e16, "h": -0.5, "inf": math.inf, "ninf": -math.inf, "t": True,
           "odd key": "x", "arr": [1, 2.5, "a", False, [1, [2]]],
           "table": {"a": 1, "nested": {"b": [1, 2], "c": {"d": "e"}}, "empty": {},
                     "list of tables": [{"x": 1}]},
           "empty": {}}
    back = tomllib.loads(to_toml(doc))
    assert back == doc
    nan = tomllib.loads(to_toml({"n": math.nan}))["n"]
    assert math.isnan(nan)
    with pytest.raises(ValueError, match=r"table\.x: NoneType None cannot be written"):
        to_toml({"table": {"x": None}})


# -- the linear solver of the implicit estimators -----------------------------------------

IMPLICIT = {**MLP, "estimator": {"name": "implicit", "settings": {}}}
SOLVER_SEARCH = """
"estimator.name" = { categorical = ["truncated", "implicit", "fixed_point"] }
"estimator.settings.solver.maxiter" = { int = [5, 50] }
"estimator.settings.solver.damping" = { float = [1e-4, 1e-1], log = true }
"""


def test_solver_budget_and_damping_are_searched_on_each_estimators_default_solver():
    s = space(SOLVER_SEARCH, IMPLICIT)
    specs = {sp.path: sp for sp in s}
    assert specs["estimator.settings.solver.maxiter"].estimators == ("implicit", "fixed_point")
    for est, cls in [("implicit", hg.ConjugateGradient), ("fixed_point", hg.GMRES)]:
        values = {"estimator.name": est, "estimator.settings.solver.maxiter": 7,
                  "estimator.settings.solver.damping": 0.01}
        assert s.suggest(optuna.trial.FixedTrial(values)) == values
        document, cfg = build_config(IMPLICIT, values)
        solver = hg.make_estimator(cfg.estimator.name, **cfg.estimator.settings).solver
        assert type(solver) is cls and (solver.maxiter, solver.damping) == (7, 0.01)
        # the trial's config as TOML gives the same solver back
        again = parse_config(tomllib.loads(to_toml(document)))
        assert again.estimator.settings == cfg.estimator.settings
    values = {"estimator.name": "truncated"}  # takes no solver: none drawn
    assert s.suggest(optuna.trial.FixedTrial(values)) == values
    assert "solver" not in build_config(IMPLICIT, values)[1].estimator.settings


def test_solver_kind_is_a_categorical_and_fields_follow_the_base_solver():
    base = copy.deepcopy(IMPLICIT)
    base["estimator"]["settings"]["solver"] = {"name": "gmres", "maxiter": 60}
    text = ('"estimator.settings.solver" = { categorical = ["cg", "gmres"] }\n'
            '"estimator.settings.solver.tol" = { float = [1e-8, 1e-4], log = true }')
    s = space(text, base)
    values = {"estimator.settings.solver": "cg", "estimator.settings.solver.tol": 1e-6}
    assert s.suggest(optuna.trial.FixedTrial(values)) == values
    assert build_config(base, values)[1].estimator.settings["solver"] == \
        {"name": "cg", "maxiter": 60, "tol": 1e-6}
    # a base setting one of the choices does not take: refused before any trial
    base["estimator"]["settings"]["solver"]["restart"] = 10
    assert "solver 'cg' takes tol, maxiter, damping, preconditioner; not restart" in \
        error(text, base)
    assert error('"estimator.settings.solver.restart" = { int = [5, 40] }', IMPLICIT) == \
        ('search."estimator.settings.solver.restart": unknown key: the \'cg\' solver takes '
         'tol, maxiter, damping, preconditioner')


@pytest.mark.parametrize("text, message", [
    ('"estimator.settings.solver" = { categorical = ["cg", "qr"] }',
     "choice = 'qr' with estimator.name = 'implicit' is not a valid config value: "
     "estimator.settings: invalid for 'implicit': solver name must be one of"),
    ('"estimator.settings.solver.maxiter" = { int = [0, 9] }',
     "low = 0 with estimator.name = 'implicit' is not a valid config value"),
    ('"estimator.settings.solver.damping" = { float = [-1.0, 1.0] }',
     "damping must be finite and >= 0, got -1.0"),
    ('"estimator.settings.solver.name" = { categorical = ["cg"] }',
     'search the solver as "estimator.settings.solver"'),
    ('"estimator.settings.solver.preconditioner" = { categorical = ["x"] }',
     "its value cannot be written in TOML"),
    ('"estimator.settings.window.size" = { int = [1, 2] }', "except solver"),
    ('"estimator.settings.solver" = { categorical = ["cg"] }\n'
     '"estimator.name" = { categorical = ["fixed_point"] }',
     "choice = 'cg' with estimator.name = 'fixed_point' is not a valid config value"),
])
def test_solver_search_errors_name_the_key(text, message):
    assert message in error(text, IMPLICIT)


def test_make_solver_and_make_estimator_take_names_and_tables():
    assert hg.make_solver("gmres") == hg.GMRES()
    assert hg.make_solver({"name": "cg", "maxiter": 3}) == hg.ConjugateGradient(maxiter=3)
    cg = hg.ConjugateGradient(damping=0.5)
    assert hg.make_solver(cg) is cg
    assert hg.make_estimator("implicit", solver={"name": "neumann", "terms": 4}).solver == \
        hg.Neumann(terms=4)
    for bad, kind, message in [({"maxiter": 3}, ValueError, "got None"),
                               ("lu", ValueError, "must be one of"),
                               ({"name": "cg", "terms": 2}, ValueError, "not terms"),
                               (3, TypeError, "solver must be a name")]:
        with pytest.raises(kind, match=message):
            hg.make_solver(bad)

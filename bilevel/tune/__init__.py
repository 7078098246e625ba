"""Optuna over a config's discrete settings (``bilevel tune``); hypergradients inside.

:mod:`bilevel.tune.search` parses and checks the ``[search]`` table, draws a trial's values
and writes a config back as TOML. :mod:`bilevel.tune.pruning` reports the outer loop's
curve to a trial and prunes it cleanly (checkpoint kept) when the pruner says so or the
hypergradient blows up. :mod:`bilevel.tune.worker` is ``bilevel tune``: one Optuna worker
(trials run as ``bilevel run`` does, in ``OUT/<study>/trial-<number>``), several of which
share a study through ``--storage``.
"""

from .pruning import OptunaPruning, Pruned, run_trial
from .search import (
    SEARCH_TABLE,
    UNSEARCHABLE,
    SearchSpace,
    Spec,
    apply,
    build_config,
    split_search,
    to_toml,
)
from .worker import cmd_tune, run_one, work, write_best

__all__ = ["SEARCH_TABLE", "UNSEARCHABLE", "OptunaPruning", "Pruned", "SearchSpace", "Spec",
           "apply", "build_config", "cmd_tune", "run_one", "run_trial", "split_search",
           "to_toml", "work", "write_best"]

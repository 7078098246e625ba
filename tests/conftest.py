import getpass
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# torch.compile's inductor caches compiled kernels in one directory whose keys do not
# record ATEN_CPU_CAPABILITY: after a run at the machine's own level, a run under
# ATEN_CPU_CAPABILITY=avx2 reuses AVX-512 kernels (LV-HBA's compiled step returned NaN)
# and one under =default fails to compile against the cached precompiled header. Keep
# one cache per capability (only when the capability is forced and no cache is chosen).
if "ATEN_CPU_CAPABILITY" in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(),
        f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite's problems are tiny: with several threads, thread hand-offs cost more than the
# arithmetic (and a busy machine makes them much slower); tests that need more set it.
# BILEVEL_TEST_THREADS=n (default 1) runs the suite at n intra-op threads instead, e.g. to
# check that no tolerance depends on the reduction order of one thread count:
#     BILEVEL_TEST_THREADS=2 OMP_NUM_THREADS=2 python -m pytest -q
_threads = os.environ.get("BILEVEL_TEST_THREADS", "1")
if not _threads.isdigit() or int(_threads) < 1:
    raise ValueError(f"BILEVEL_TEST_THREADS must be a positive integer, got {_threads!r}")
torch.set_num_threads(int(_threads))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Caches (e.g. distillation's full-data reference) go to a temp folder, never into the
    user's ~/.cache/bilevel; example subprocesses inherit the variable."""
    monkeypatch.setenv("BILEVEL_CACHE", str(tmp_path_factory.mktemp("bilevel_cache")))


@pytest.fixture
def quiet_optuna():
    """Optuna's INFO lines (one per trial) off for a test; its level restored after."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(level)

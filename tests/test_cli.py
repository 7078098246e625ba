"""The ``bilevel`` command line: help, strict config errors, run, resume, the MLP example."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.cli import main
from bilevel.config import ConvNetModelConfig, ModelConfig, load_config
from bilevel.data import FASHION_MNIST_ROOT

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
    ("sizes = [8]", "sizes = [8]\nwidth = 4", "model.width: unknown key (allowed in [model] "
     "for kind = 'mlp': sizes, kind)"),
    ("sizes = [8]", 'kind = "resnet"', "model.kind: expected one of 'mlp', 'convnet', got str"),
    ("sizes = [8]", 'kind = "convnet"', "model.kind: 'convnet' needs image data"),
    ('dataset = "iris"', 'dataset = "iris"\nlimit = 0', "data.limit: expected a positive"),
    ('dataset = "iris"', 'dataset = "iris"\nlimit = 2.5',
     "data.limit: expected integer, got float"),
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
    (last,) = (out / "checkpoints").glob("step-00000004-*.pt")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().split("\n")
             if line]
    assert steps == [0, 1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 0 <= summary["tuned_test_acc"] <= 1
    assert {"tuned_val_acc", "initial_val_acc", "initial_test_acc", "seconds"} <= set(summary)
    # summary.json names each hyperparameter by what it is and holds its values, not logs
    hp = summary["hyperparameters"]
    h = load_config(cfg).hyperparameters
    assert hp["inner_lr"]["initial"] == h.lr
    assert hp["weight_decay"]["initial"] == [h.weight_decay] * 2
    assert hp["weight_decay"]["layers"] == ["0.weight", "2.weight"]
    tuned = torch.load(out / "hparams.pt")
    assert hp["inner_lr"]["tuned"] == pytest.approx(float(tuned["log_lr"].exp()), rel=1e-6)
    assert hp["inner_lr"]["tuned"] != hp["inner_lr"]["initial"]
    # the metrics hold every hyperparameter's trajectory: row k at the values its outer loss
    # belongs to (after k updates), from the initial ones
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n") if line]
    assert rows[0]["inner_lr"] == pytest.approx(h.lr, rel=1e-6)
    assert [rows[0][f"weight_decay.{n}"] for n in hp["weight_decay"]["layers"]] == \
        pytest.approx(hp["weight_decay"]["initial"], rel=1e-6)
    assert len({r["inner_lr"] for r in rows}) == 4  # one value per update
    assert (out / "hyperparameters.png").stat().st_size > 10_000
    assert f"inner learning rate: {h.lr:.4g} -> {hp['inner_lr']['tuned']:.4g}" in r.stdout
    # a deleted last checkpoint is redone by resume
    last.unlink()
    r = bilevel("resume", str(out))
    assert r.returncode == 0, r.stderr
    assert "at outer step 3" in r.stderr
    assert last.is_file()


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


CONVNET = 'kind = "convnet"\nwidth = 4\ndepth = 1'


@pytest.mark.parametrize("model, data, expected", [
    (CONVNET + "\nsizes = [8]", "", "model.sizes: unknown key (allowed in [model] for kind = "
     "'convnet': kind, width, depth, norm)"),
    (CONVNET + '\nnorm = "batch"', "", "model.norm: expected one of 'instance', 'none'"),
    (CONVNET.replace("width = 4", "width = 0"), "", "model.width: expected a positive"),
    (CONVNET.replace("depth = 1", "depth = 4"), "", "model.depth: digits images are 8x8, too "
     "small for depth 4 (each block halves the size; at most 3)"),
    (CONVNET, "\ntrain = 0.5", "data.train: not used with"),
    (CONVNET, "\nval = 1.0", "data.val: expected a fraction in (0, 1)"),
])
def test_bad_convnet_config(tmp_path: Path, capsys: pytest.CaptureFixture, model: str,
                            data: str, expected: str) -> None:
    """ConvNet keys, and image datasets with their own split (a folder here)."""
    out = tmp_path / "out"
    text = TINY.format(steps=3, out=out.as_posix()).replace("sizes = [8]", model)
    folder = tmp_path / "imgs"
    folder.mkdir()
    dataset = "digits" if "depth = 4" in model or not data else folder.as_posix()
    text = text.replace('dataset = "iris"', f'dataset = "{dataset}"{data}')
    assert main(["run", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_bad_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A path that exists but is no dataset: a data error at run time, before any output."""
    out = tmp_path / "out"
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    text = TINY.format(steps=3, out=out.as_posix()).replace(
        'dataset = "iris"', f'dataset = "{(tmp_path / "imgs").as_posix()}"')
    assert main(["run", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert "data.dataset: " in err and "not an image folder with train/ and test/" in err
    assert not out.exists()


@pytest.mark.skipif(Path(FASHION_MNIST_ROOT).exists(), reason="Fashion-MNIST is installed")
def test_fashion_mnist_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    text = TINY.format(steps=1, out=out.as_posix()).replace('"iris"', '"fashion_mnist"')
    assert main(["run", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert "data.dataset: Fashion-MNIST not found" in err and "dataset-fashion-mnist" in err
    assert not out.exists()


def test_example_configs_parse() -> None:
    mlp = load_config(ROOT / "examples" / "configs" / "digits_mlp.toml")
    assert isinstance(mlp.model, ModelConfig) and mlp.model.sizes == [64]
    assert (mlp.data.train, mlp.data.val, mlp.data.limit) == (0.5, 0.25, None)
    conv = load_config(ROOT / "examples" / "configs" / "digits_convnet.toml")
    assert isinstance(conv.model, ConvNetModelConfig) and conv.model.norm == "instance"


@pytest.fixture
def one_thread():
    """A single intra-op thread: small convolutions on a busy shared CPU run much faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_digits_convnet_example(tmp_path: Path, capsys: pytest.CaptureFixture,
                                one_thread: None) -> None:
    text = (ROOT / "examples" / "configs" / "digits_convnet.toml").read_text()
    out = tmp_path / "out"
    for old, new in [("steps = 10\n", "steps = 2\n"), ('dir = "runs/digits_convnet"',
                                                      f'dir = "{out.as_posix()}"')]:
        assert text.count(old) == 1
        text = text.replace(old, new)
    assert main(["run", str(write(tmp_path, text))]) == 0
    assert "tuned" in capsys.readouterr().out
    for name in ("config.toml", "metrics.jsonl", "metrics.csv", "hparams.pt", "summary.json",
                 "outer_loss.png", "val_accuracy.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["complete"]
    assert 0 <= summary["tuned_test_acc"] <= 1
    assert summary["tuned_val_acc"] > 0.2  # 10 classes
    wd = summary["hyperparameters"]["weight_decay"]
    assert len(wd["tuned"]) == len(wd["layers"]) == 3  # two conv layers and the classifier
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and all(r["hypergrad_norm"] > 0 for r in rows)


def test_image_folder_run(tmp_path: Path, one_thread: None) -> None:
    """A ConvNet and an MLP on a folder of PNGs: its test split is the test set."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for label, cls in enumerate(("a", "b")):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 100, (4, 4)) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    for model in (CONVNET, "sizes = [4]"):
        out = tmp_path / "out"
        text = TINY.format(steps=1, out=out.as_posix()).replace("sizes = [8]", model).replace(
            'dataset = "iris"', f'dataset = "{(tmp_path / "imgs").as_posix()}"\nval = 0.34\n'
            "limit = 3")
        assert main(["run", str(write(tmp_path, text)), "--overwrite"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 1 and 0 <= summary["tuned_test_acc"] <= 1
        # test accuracy is over the 4 test images
        acc = summary["tuned_test_acc"]
        assert acc * 4 == pytest.approx(round(acc * 4))


def test_version(capsys):
    import bilevel

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"bilevel {bilevel.__version__}"


# TINY with an implicit estimator whose linear solve cannot converge (one CG iteration)
IMPLICIT = TINY.replace('name = "truncated"\nsettings = {{ window = 5 }}',
                        'name = "implicit"\nsettings = {{ solver = {{ name = "cg", '
                        'maxiter = 1 }} }}').replace("checkpoint_every = 1\n", "")


def _warning_lines(err: str, kind: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"bilevel: warning: {kind}")]


def test_warnings_as_the_command_shows_them(tmp_path: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path, IMPLICIT.format(steps=4, out=(tmp_path / "out").as_posix()))
    monkeypatch.delenv("BILEVEL_WARNINGS", raising=False)
    assert main(["run", str(cfg)]) == 0
    out, err = capsys.readouterr()
    # each kind once, as one `bilevel: warning:` line (no source line of the library),
    # then one count per kind; the inner learning rate is said not to be tuned
    shown = _warning_lines(err, "ConvergenceWarning: ")
    assert len(shown) == 2 and all("BILEVEL_WARNINGS=all" in line for line in shown)
    assert len(_warning_lines(err, "ConvergenceWarning (")) == 2
    assert "x 4 in 4 outer steps" in err and "warnings.warn" not in err
    assert len(_warning_lines(err, "UserWarning: hyperparameters.tune: log_lr stays")) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["hyperparameters"]["inner_lr"] == {"initial": 0.1, "tuned": 0.1,
                                                      "fixed": True}
    assert "inner learning rate" not in out and "weight decay of" in out
    # every one of them with BILEVEL_WARNINGS=all; none with -qq (errors only)
    monkeypatch.setenv("BILEVEL_WARNINGS", "all")
    assert main(["run", str(cfg), "--overwrite"]) == 0
    assert len(_warning_lines(capsys.readouterr().err, "ConvergenceWarning: ")) == 8
    monkeypatch.delenv("BILEVEL_WARNINGS")
    assert main(["-qq", "run", str(cfg), "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err
    # only the inner learning rate to tune, by an implicit estimator: nothing to tune
    cfg.write_text(cfg.read_text().replace('["log_lr", "log_wd"]', '["log_lr"]'))
    assert main(["run", str(cfg), "--overwrite"]) == 2
    assert "hyperparameters.tune: nothing to tune" in capsys.readouterr().err


def test_quiet_distill_prints_only_its_results(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    args = ["distill", "--ipc", "1", "--outer-steps", "2", "--eval-nets", "1",
            "--no-reference", "--out", str(tmp_path / "d")]
    assert main(args) == 0
    assert "outer step 2/2" in capsys.readouterr().err  # progress lines without a terminal
    assert main(["-q", *args, "--overwrite"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "distilled" in out

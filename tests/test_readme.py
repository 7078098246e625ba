"""The README's example runs as written."""

import re
from pathlib import Path


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples may write files (runs/...)
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.diagnostics.solve_converged
    assert result.diagnostics.inner_grad_norm < 1e-8
    history = namespace["loop"].history
    assert len(history) == 20 and history[-1]["outer_loss"] < history[0]["outer_loss"]
    report = namespace["report"]
    assert report.distilled.mean > report.random.mean
    assert (tmp_path / "runs" / "digits_ipc1.pt").is_file()

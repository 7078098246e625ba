"""Every Python block of the documentation runs as written.

For each page under docs/, its ```python blocks run in order in one namespace, in a fresh
working directory, on one torch thread. Shell commands (```bash / ```console) and
pseudo-code or output (```text) are not run; a fence without a language is refused, so a
fragment cannot pass for runnable code by accident. README.md's blocks are run, with
assertions on their results, by tests/test_readme.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md"))
FENCE = re.compile(r"^([ \t]*)(`{3,}|~{3,})(.*)$")
LANGUAGES = {"python", "bash", "console", "text", "toml", "json"}
#: seconds one page's blocks may take (the whole test must stay well under a minute)
PAGE_BUDGET = 20.0


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block of a Markdown text, in order.

    Indented fences (inside a list item) are dedented by the fence's own indentation.
    """
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = match.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(rf"^[ \t]*{fence}\s*$", lines[i]):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        if i == len(lines):
            raise ValueError(f"line {start}: the code block is never closed")
        blocks.append((start, info.strip().split(" ")[0], "\n".join(body) + "\n"))
        i += 1
    return blocks


def test_code_blocks_are_parsed():
    text = "a\n```python\nx = 1\n```\n\n  ```bash\n  make test\n  ```\n```text\nf(...)\n```\n"
    assert code_blocks(text) == [(2, "python", "x = 1\n"), (6, "bash", "make test\n"),
                                 (9, "text", "f(...)\n")]
    with pytest.raises(ValueError, match="never closed"):
        code_blocks("```python\nx = 1\n")


def test_pages_are_found():
    assert "docs/index.md" in PAGES and "docs/getting-started.md" in PAGES
    assert "docs/estimators.md" in PAGES and len(PAGES) >= 12


@pytest.mark.parametrize("page", PAGES)
def test_fences_name_their_language(page):
    blocks = code_blocks((ROOT / page).read_text())
    bad = [(line, lang) for line, lang, _ in blocks if lang not in LANGUAGES]
    assert not bad, (f"{page}: code blocks must name one of {sorted(LANGUAGES)} "
                     f"(runnable Python as python, pseudo-code and output as text); "
                     f"got {bad} (line, language)")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in (ROOT / p).read_text()])
def test_python_blocks_run(page, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)              # the examples write files (runs/...)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    blocks = [(line, code) for line, lang, code in code_blocks((ROOT / page).read_text())
              if lang == "python"]
    namespace: dict = {"__name__": "__docs__"}
    start = time.perf_counter()
    for line, code in blocks:
        exec(compile(code, f"{page}:{line}", "exec"), namespace)
    seconds = time.perf_counter() - start
    assert seconds < PAGE_BUDGET, (f"{page}: its Python blocks took {seconds:.1f} s; keep the "
                                   f"examples small (under {PAGE_BUDGET:.0f} s per page)")


def test_api_reference_docstring_rewrites():
    """The build's griffe extension (docs/api/griffe_docstrings.py): Sphinx roles become
    optional cross-references, math stars are escaped outside code, grouped parameters
    are split. Needs the docs extra (`make docs` installs it)."""
    pytest.importorskip("griffe")
    import importlib.util

    spec = importlib.util.spec_from_file_location("griffe_docstrings",
                                                  DOCS / "api" / "griffe_docstrings.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    assert ext.replace_roles("see :class:`~hypergrad.problem.Problem`.") == (
        'see <autoref identifier="hypergrad.problem.Problem" optional>'
        "<code>Problem</code></autoref>.")
    assert ext.escape_math_stars("at w* and f(μ*, λ); *not* ``w*``\n\n    F(w*)") == (
        "at w\\* and f(μ\\*, λ); *not* ``w*``\n\n    F(w*)")
    text = ("Args:\n    a, b (int): the sizes\n        of both.\n    c: one.\n\n"
            "Raises:\n    X: y, z: w")
    assert ext.split_groups(text) == ("Args:\n    a (int): the sizes\n        of both.\n"
                                      "    b (int): the sizes\n        of both.\n    c: one.\n\n"
                                      "Raises:\n    X: y, z: w")

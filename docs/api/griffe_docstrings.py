"""A griffe extension for the API reference: the docstrings' house style in Markdown.

The docstrings are Google style with three habits Markdown does not render as meant:

* Sphinx roles (``:class:`~hypergrad.problem.Problem```, ``:func:`root_vjp```), which
  would show verbatim. Each becomes an optional cross-reference: a link where the target
  is rendered in the reference, plain code otherwise (no warning, so ``--strict`` holds).
* Math stars: ``w*`` or ``f(w*, λ)`` would open Markdown emphasis that a later star
  closes (``w*`` lost its star and the text between went italic). A star right after a
  lone letter (``w*``, ``μ*``) is escaped, outside code spans and indented code blocks;
  emphasis such as ``*not*`` is left alone.
* Grouped entries in ``Args:``/``Attributes:`` sections (``train_x, test_x: images ...``
  or ``net / width / depth: the network``), which griffe would read as one parameter
  missing from the signature. Each name gets its own entry with the group's description.

Loaded by mkdocstrings through ``extensions:`` in mkdocs.yml; not part of the package.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+)`")
SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Params|Attributes|Other Parameters|"
                     r"Keyword Args|Keyword Arguments):\s*$")
GROUP = re.compile(r"^(\s*)([A-Za-z_]\w*(?:\s*[,/]\s*[A-Za-z_]\w*)+)(\s*\([^)]*\))?:(\s.*|)$")


def replace_roles(text: str) -> str:
    """``text`` with every Sphinx role replaced by an optional autorefs cross-reference."""

    def one(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2).strip().rstrip("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        return (f'<autoref identifier="{html.escape(target)}" optional>'
                f"<code>{html.escape(shown)}</code></autoref>")

    return ROLE.sub(one, text)


MATH_STAR = re.compile(r"(?<![\w*\\])([^\W\d_])\*")
CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")


def escape_math_stars(text: str) -> str:
    """``text`` with the star of ``w*``-like names escaped, outside code."""
    out, last_text_indent, in_code = [], 0, False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            out.append(line)
            continue
        indent = _indent(line)
        after_blank = i > 0 and not lines[i - 1].strip()
        if (after_blank or in_code) and indent >= last_text_indent + 4:
            in_code = True                      # an indented code block: verbatim
            out.append(line)
            continue
        in_code, last_text_indent = False, indent
        parts, pos = [], 0
        for span in CODE_SPAN.finditer(line):
            parts.append(MATH_STAR.sub(r"\1\\*", line[pos:span.start()]))
            parts.append(span.group(0))
            pos = span.end()
        parts.append(MATH_STAR.sub(r"\1\\*", line[pos:]))
        out.append("".join(parts))
    return "\n".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_groups(text: str) -> str:
    """``text`` with each grouped entry of a parameter/attribute section split per name."""
    lines = text.splitlines()
    out: list[str] = []
    i, section_indent, entry_indent = 0, None, None
    while i < len(lines):
        line = lines[i]
        header = SECTION.match(line)
        if header:
            section_indent, entry_indent = len(header.group(1)), None
            out.append(line)
            i += 1
            continue
        if section_indent is not None and line.strip():
            if _indent(line) <= section_indent:
                section_indent = None          # the section ended
            elif entry_indent is None:
                entry_indent = _indent(line)
        group = GROUP.match(line) if section_indent is not None else None
        if group and _indent(line) == entry_indent:
            body = [line]
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > entry_indent):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                i -= 1
                body.pop()
            names = re.split(r"\s*[,/]\s*", group.group(2))
            for name in names:
                out.append(f"{group.group(1)}{name}{group.group(3) or ''}:{group.group(4)}")
                out.extend(body[1:])
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class HouseStyle(griffe.Extension):
    """Rewrites every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = replace_roles(obj.docstring.value)
            obj.docstring.value = split_groups(escape_math_stars(text))

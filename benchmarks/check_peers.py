"""Check a result of benchmarks/peers.py: fail when a figure regresses past its target by
more than the noise, or when two sides of a comparison disagree.

Usage::

    python benchmarks/check_peers.py RESULT.json [--noise 0.05] [--sections a,b]
        [--structure-only] [--strict]

A row passes when its results agree (``agree`` is not false) and its ``value`` is at most
``target × (1 + noise)``, where ``noise`` is the larger of the row's own (the interquartile
range of its per-round ratios over their median, recorded by peers.py), counted up to
``NOISE_CAP`` = 0.25, and ``--noise`` (default 0.05); an accuracy (``metric: "rel_error"``)
gets only its own (0), capped alike. The cap keeps a very noisy row from passing any
regression: past 25 % of spread the measurement says nothing and the row fails until it is
measured again with less noise (or ``--noise`` is raised on purpose). An infinite or NaN
``value`` always fails. Rows without a target are only checked for agreement; a row with
``met: false`` but inside the noise passes, marked "within noise". A section that was not
available (its code missing) is skipped, unless ``--strict``; a section that crashed
(``error: true``) fails. A file with no rows, or whose rows were all skipped, fails.
``--sections`` requires those sections to be present with at least one available row;
``--structure-only`` checks presence and agreement but not the targets (for smoke runs at
small sizes, whose ratios mean nothing).

Exit status: 0 when every row passes, 1 otherwise, 2 for an unreadable file or a malformed
row (not a JSON object, or a ``value``, ``target`` or ``noise`` that is not a number).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

NOISE_CAP = 0.25
"""The most of a row's own noise (relative spread) that widens its band above the target."""


class MalformedRow(ValueError):
    """A row of the result that is not a peers.py row (exit status 2)."""


def _number(r: dict[str, Any], key: str, where: str) -> float | None:
    """``r[key]`` as a float (None when absent or null); MalformedRow when not a number."""
    x = r.get(key)
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise MalformedRow(f"{where}: {key!r} is not a number: {x!r}")
    return float(x)


def _where(i: int, r: Any) -> str:
    if isinstance(r, dict):
        return f"row {i} ({r.get('section', '?')} / {r.get('name', '?')})"
    return f"row {i}"


def check_row(r: dict[str, Any], noise_floor: float, structure_only: bool,
              strict: bool, where: str = "row") -> tuple[str, str]:
    """(status, reason) of one row; status is "ok", "skip" or "FAIL".

    Raises:
        MalformedRow: ``r`` is not a dict, or its ``value``, ``target`` or ``noise`` is
            present but not a number (``where`` names the row in the message).
    """
    if not isinstance(r, dict):
        raise MalformedRow(f"{where}: not a JSON object: {r!r:.80}")
    value, target = _number(r, "value", where), _number(r, "target", where)
    own = _number(r, "noise", where)
    if r.get("error"):
        return "FAIL", f"section failed: {r.get('why', '?')}"
    if r.get("available") is False:
        return ("FAIL" if strict else "skip"), f"not available: {r.get('why', '?')}"
    if r.get("agree") is False:
        return "FAIL", (f"results disagree: rel_diff {r.get('rel_diff')} > "
                        f"{r.get('agree_tol')}")
    if structure_only or target is None:
        return "ok", "agreement only" if target is None else "structure only"
    if not math.isfinite(target):
        raise MalformedRow(f"{where}: target is not finite: {target!r}")
    if value is None or math.isnan(value):
        return "FAIL", "no value to compare with the target"
    if math.isinf(value):
        return "FAIL", f"value {value} is not finite"
    # NaN or negative own noise: no allowance of its own; inf: the cap
    noise = min(own, NOISE_CAP) if own is not None and own > 0 else 0.0
    if r.get("metric") != "rel_error":  # timings and memory; an accuracy is not noisy
        noise = max(noise, noise_floor)
    bound = target * (1 + noise)
    if value <= target:
        return "ok", f"{value:.3g} <= {target:g}"
    if value <= bound:
        return "ok", f"within noise: {value:.3g} <= {target:g} x (1 + {noise:.2f})"
    return "FAIL", f"{value:.3g} > {target:g} x (1 + {noise:.2f}) = {bound:.3g}"


def check(data: dict[str, Any], noise_floor: float = 0.05, sections: list[str] | None = None,
          structure_only: bool = False, strict: bool = False) -> tuple[int, list[str]]:
    """(number of failures, report lines) for a loaded peers.py result.

    Raises:
        MalformedRow: as :func:`check_row`, naming the row by its index.
    """
    results = data.get("results")
    if not isinstance(results, list):
        return 1, ["FAIL  the file has no 'results' list"]
    if not results:
        return 1, ["FAIL  no results: the 'results' list is empty"]
    lines, failures, checked = [], 0, 0
    for i, r in enumerate(results):
        status, reason = check_row(r, noise_floor, structure_only, strict, _where(i, r))
        failures += status == "FAIL"
        checked += status != "skip"
        lines.append(f"{status:4}  {str(r.get('section', '?')):16} "
                     f"{str(r.get('name', '?')):44} {reason}")
    if not checked:
        failures += 1
        lines.append("FAIL  no results checked: every row was skipped (not available)")
    for s in sections or []:
        rows = [r for r in results if r.get("section") == s]
        if not rows:
            failures += 1
            lines.append(f"FAIL  {s:16} section missing")
        elif all(r.get("available") is False for r in rows) and not any(
                r.get("error") for r in rows):
            failures += 1
            lines.append(f"FAIL  {s:16} section required but not available")
    return failures, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("result", type=Path, help="JSON written by benchmarks/peers.py")
    ap.add_argument("--noise", type=float, default=0.05,
                    help="least relative slack above a target (default 0.05)")
    ap.add_argument("--sections", default="",
                    help="comma-separated sections that must be present and available")
    ap.add_argument("--structure-only", action="store_true",
                    help="check presence and agreement, not the targets")
    ap.add_argument("--strict", action="store_true",
                    help="a section that was not available fails")
    args = ap.parse_args(argv)
    if not (args.noise >= 0 and math.isfinite(args.noise)):
        ap.error(f"--noise must be a finite number >= 0, got {args.noise}")
    try:
        data = json.loads(args.result.read_text())
    except (OSError, ValueError) as e:
        print(f"cannot read {args.result}: {e}", file=sys.stderr)
        return 2
    if not isinstance(data, dict):
        print(f"{args.result}: not a peers.py result (a JSON object)", file=sys.stderr)
        return 2
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    try:
        failures, lines = check(data, args.noise, sections, args.structure_only, args.strict)
    except MalformedRow as e:
        print(f"{args.result}: not a peers.py result: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"{failures} failure(s)" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

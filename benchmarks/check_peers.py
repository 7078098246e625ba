"""Check a result of benchmarks/peers.py: fail when a figure regresses past its target by
more than the noise, or when two sides of a comparison disagree.

Usage::

    python benchmarks/check_peers.py RESULT.json [--noise 0.05] [--sections a,b]
        [--structure-only] [--strict]

A row passes when its results agree (``agree`` is not false) and its ``value`` is at most
``target × (1 + noise)``, where ``noise`` is the larger of the row's own (the interquartile
range of its per-round ratios over their median, recorded by peers.py) and ``--noise``
(default 0.05); an accuracy (``metric: "rel_error"``) gets only its own (0). Rows
without a target are only checked for agreement; a row with ``met: false`` but inside
the noise passes, marked "within noise". A section that was not available (its code
missing) is skipped, unless ``--strict``; a section that crashed (``error: true``) fails.
``--sections`` requires those sections to be present with at least one available row;
``--structure-only`` checks presence and agreement but not the targets (for smoke runs at
small sizes, whose ratios mean nothing).

Exit status: 0 when every row passes, 1 otherwise, 2 for an unreadable file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def check_row(r: dict[str, Any], noise_floor: float, structure_only: bool,
              strict: bool) -> tuple[str, str]:
    """(status, reason) of one row; status is "ok", "skip" or "FAIL"."""
    if r.get("error"):
        return "FAIL", f"section failed: {r.get('why', '?')}"
    if r.get("available") is False:
        return ("FAIL" if strict else "skip"), f"not available: {r.get('why', '?')}"
    if r.get("agree") is False:
        return "FAIL", (f"results disagree: rel_diff {r.get('rel_diff')} > "
                        f"{r.get('agree_tol')}")
    target, value = r.get("target"), r.get("value")
    if structure_only or target is None:
        return "ok", "agreement only" if target is None else "structure only"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "FAIL", "no value to compare with the target"
    noise = float(r.get("noise") or 0.0)
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
    """(number of failures, report lines) for a loaded peers.py result."""
    results = data.get("results")
    if not isinstance(results, list):
        return 1, ["FAIL  the file has no 'results' list"]
    lines, failures = [], 0
    for r in results:
        status, reason = check_row(r, noise_floor, structure_only, strict)
        failures += status == "FAIL"
        lines.append(f"{status:4}  {r.get('section', '?'):16} {r.get('name', '?'):44} {reason}")
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
    failures, lines = check(data, args.noise, sections, args.structure_only, args.strict)
    print("\n".join(lines))
    print(f"{failures} failure(s)" if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

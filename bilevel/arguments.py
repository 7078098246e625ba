"""Argument types of the command lines: numbers refused at parse time, with argparse's
usage message and exit status 2, instead of failing after the work started."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type, low: float, strict: bool, what: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or (value <= low if strict else value < low):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1."""
    return int(_number(text, int, 0, True, "an integer >= 1"))


def non_negative_int(text: str) -> int:
    """An int >= 0."""
    return int(_number(text, int, 0, False, "an integer >= 0"))


def seed(text: str) -> int:
    """An int in [0, 2**63), what ``torch.manual_seed`` takes."""
    value = int(_number(text, int, 0, False, "an integer seed >= 0"))
    if value >= 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**63, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    return float(_number(text, float, 0.0, True, "a finite number > 0"))


__all__ = ["non_negative_int", "positive_float", "positive_int", "seed"]

"""One way to derive seeds: a base seed mixed with indices (outer step, inner step, draw).

Everything seeded per step (random-window draws, SABA's samples, dropout masks of a
wrapped model, the fresh network and outer batch of each distillation step) takes its
seed from :func:`mix_seed`, so that a run replays, recomputes and resumes identically.
"""

from __future__ import annotations

#: the seeds stay below 2**63 − 1, the largest value ``torch.manual_seed`` accepts
_MODULUS = 2 ** 63 - 1


def mix_seed(seed: int, *indices: int) -> int:
    """A seed derived from ``seed`` and the ``indices`` (e.g. the outer step), one after
    another: ``s ← (s · 1000003 + i · 7919 + 17) mod (2⁶³ − 1)``. Different index tuples
    give different seeds for all practical seeds and step counts.

    Returns:
        An int in [0, 2⁶³ − 1), suitable for ``torch.Generator().manual_seed``.

    Raises:
        TypeError: a seed or an index that is not an int (booleans included).
    """
    for value in (seed, *indices):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"mix_seed takes ints, got {value!r}")
    s = seed % _MODULUS
    for i in indices:
        s = (s * 1_000_003 + i * 7_919 + 17) % _MODULUS
    return s


__all__ = ["mix_seed"]

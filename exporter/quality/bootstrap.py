"""Bootstrap standard errors over evaluation units (WikiText-2 windows, LAMBADA passages), and paired differences.

A metric is a function of column sums over units (KL = sum kl / sum positions, perplexity =
exp(sum nll / sum tokens), accuracy = sum hits / passages), so a resample is a weight per unit (how many
times it was drawn) and every draw's sums are one matrix product. Two models scored on the same units are
compared with the same draws (paired): their difference has a much smaller error than either number.
"""

from __future__ import annotations

import math

import numpy as np

DRAWS = 2000
SEED = 0
Z = 2.0  # a difference is "distinguishable" beyond about 2 standard errors (~95%)


def _weights(units: int, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """[draws, units] how often each unit is drawn in each resample (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(units, np.full(units, 1.0 / units), size=draws).astype(np.float64)


def ratio(sums: np.ndarray) -> np.ndarray:
    return sums[..., 0] / sums[..., 1]


def exp_ratio(sums: np.ndarray) -> np.ndarray:
    return np.exp(sums[..., 0] / sums[..., 1])


def standard_error(units, stat=ratio, draws: int = DRAWS, seed: int = SEED) -> float:
    """Bootstrap SE of stat(column sums) over rows of `units` ([n, m])."""
    u = np.asarray(units, dtype=np.float64)
    if len(u) < 2:
        return math.nan
    return float(stat(_weights(len(u), draws, seed) @ u).std(ddof=1))


def paired_difference(units_a, units_b, stat=ratio, draws: int = DRAWS, seed: int = SEED) -> dict:
    """stat(a) - stat(b) on the same units, its bootstrap SE, and whether it is beyond Z standard errors."""
    a, b = np.asarray(units_a, dtype=np.float64), np.asarray(units_b, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError("paired units must be the same windows / passages")
    w = _weights(len(a), draws, seed)
    diff = float(stat(a.sum(0)) - stat(b.sum(0)))
    se = float((stat(w @ a) - stat(w @ b)).std(ddof=1)) if len(a) > 1 else math.nan
    return {"difference": diff, "se": se, "distinguishable": bool(abs(diff) > Z * se)}

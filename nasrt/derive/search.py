"""The architecture search: one option per group (a layer's attention, a layer's FFN) minimising the summed
replace-one scores under resource budgets — Puzzle's grouped-knapsack MIP, solved with ``scipy.optimize.milp``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from nasrt.errors import NasrtError

log = logging.getLogger(__name__)

#: The resources a ``--budget`` may bound, as fractions of the parent.
BUDGET_KEYS = ("params", "kv", "time")


class SearchError(NasrtError):
    """No architecture of the library satisfies the budgets."""


@dataclass(frozen=True)
class Option:
    score: float
    costs: tuple[float, ...]  # one per budgeted resource


def parse_budget(text: str) -> dict[str, float]:
    """``"params=0.85,kv=0.6[,time=0.8]"`` -> ``{"params": 0.85, "kv": 0.6, ...}`` (fractions of the parent)."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in BUDGET_KEYS:
            raise NasrtError(f"--budget {text!r}: {part!r} is not one of {', '.join(k + '=F' for k in BUDGET_KEYS)}")
        if key in out:
            raise NasrtError(f"--budget {text!r}: {key} given twice")
        try:
            frac = float(value)
        except ValueError:
            raise NasrtError(f"--budget {text!r}: {value!r} is not a number") from None
        if not 0 < frac <= 1:
            raise NasrtError(f"--budget {text!r}: {key}={frac} must lie in (0, 1] (a fraction of the parent)")
        out[key] = frac
    if not out:
        raise NasrtError(f"--budget {text!r}: give at least one of {', '.join(BUDGET_KEYS)}")
    return out


def solve(groups: list[list[Option]], limits: tuple[float, ...]) -> list[int]:
    """Index of the chosen option of every group: minimum total score with ``sum(costs[r]) <= limits[r]``."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    sizes = [len(g) for g in groups]
    if any(s == 0 for s in sizes):
        raise ValueError("every group needs at least one option")
    n = sum(sizes)
    c = np.array([o.score for g in groups for o in g], dtype=float)
    rows, lo, hi = [], [], []
    start = 0
    for s in sizes:  # exactly one option per group
        row = np.zeros(n)
        row[start:start + s] = 1
        rows.append(row)
        lo.append(1)
        hi.append(1)
        start += s
    for r, limit in enumerate(limits):  # each resource row scaled by its limit (well-conditioned)
        costs = np.array([o.costs[r] for g in groups for o in g], dtype=float)
        scale = max(abs(limit), 1e-30)
        rows.append(costs / scale)
        lo.append(-np.inf)
        hi.append(limit / scale + 1e-9)
    res = milp(c, constraints=LinearConstraint(np.array(rows), lo, hi), integrality=np.ones(n),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 0})
    if res.status != 0 or res.x is None:
        raise SearchError(f"no architecture of the block library meets the budget ({res.message})")
    x = np.round(res.x).astype(int)
    out, start = [], 0
    for s in sizes:
        pick = np.flatnonzero(x[start:start + s])
        out.append(int(pick[0]))
        start += s
    return out

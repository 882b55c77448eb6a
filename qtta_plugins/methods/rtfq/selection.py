"""Choosing the most accurate subnet of a bank within a budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


# --- selection --------------------------------------------------------------------------------------
def choose(rows: list[dict[str, Any]], budget: dict[str, float]) -> dict[str, Any]:
    """The most accurate row within ``budget`` (ties: the cheaper in BitOPs)."""
    feasible = [r for r in rows if all(r[k] <= v for k, v in budget.items())]
    if not feasible:
        needs = ", ".join(f"{k} >= {min(r[k] for r in rows):.4g}" for k in budget)
        raise ValueError(
            f"no subnet of the bank fits the budget {budget}; the smallest feasible budget is "
            f"{needs} (the cheapest subnet per resource)"
        )
    return max(feasible, key=lambda r: (r["accuracy"], -r["bitops"]))


@dataclass
class SubnetChoice:
    """What :func:`select_subnet` picked, attached to the returned model as ``qtta_subnet``."""

    row: dict[str, Any]
    backend: str
    budget: dict[str, float] = field(default_factory=dict)

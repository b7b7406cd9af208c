"""Ratios of variants measured alternately, and the rows of the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Ratio:
    """The median of per-round ratios a/b, with the smallest and largest round."""

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, a: Sequence[float], b: Sequence[float]) -> Ratio:
        ratios = [x / y for x, y in zip(a, b, strict=True) if y]
        if not ratios:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(ratios))

    def __str__(self) -> str:
        if self.rounds <= 1:
            return f"{self.median:.2f}×"
        return f"{self.median:.2f}× ({self.low:.2f}–{self.high:.2f})"


@dataclass
class Row:
    """One line of the table: what, for which configuration, the figures, the target."""

    section: str
    what: str
    value: str
    target: str = ""
    met: bool | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(met: bool | None) -> str:
    return {True: "ok", False: "MISSED", None: ""}[met]

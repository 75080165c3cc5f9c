"""What every stage returns: a :class:`StageResult`, written as ``--summary`` JSON and printed for people."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from pydantic import BaseModel, Field

from raydecode.errors import ConfigError


class StageResult(BaseModel):
    stage: str
    status: str = "ok"
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict)

    def write(self, path: str) -> None:
        """Write the summary JSON atomically (a reader never sees half of it)."""
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.model_dump(), f, indent=1)
        os.replace(tmp, path)


def filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter (a path may hold ``'``: then it is double-quoted)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{value!r}: holds both ' and \", which MLflow's search filters cannot quote; rename it")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if math.isnan(c):
            return "-"
        return f"{c:.3g}" if abs(c) < 1000 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)

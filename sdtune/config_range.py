"""The valid range of a number option, declared once beside it in sdtune.config."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The values a number option may take, in interval notation: `[0, 1)`, `(0, inf)`.

    Only finite numbers are ever valid (an `inf` end means "no upper bound"), so NaN and
    infinities are refused for every option that declares a range."""

    text: str
    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Range:
        match = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])", text)
        if match is None:
            raise ValueError(f"not an interval: {text!r}")
        left, low, high, right = match.groups()
        return cls(text, float(low), float(high), left == "(", right == ")")

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def rule(self, integer: bool = False) -> str:
        """What a valid value is, for an error message (an integer is always finite)."""
        finite = "" if integer else " and finite"
        if self.low == -math.inf and self.high == math.inf:
            return "must be a finite number"
        if self.high != math.inf:
            return f"must be in {self.text}"
        if self.low == 0:
            return "must be positive" + finite if self.low_open else "must be 0 or more" + finite
        return f"must be {'above' if self.low_open else 'at least'} {self.low:g}{finite}"

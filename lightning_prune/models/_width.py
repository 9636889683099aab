"""Width multiplier shared by the paper architectures."""

from __future__ import annotations


def check_width(width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a number, got {type(width).__name__}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    return float(width)


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest integer, at least 1."""
    return max(1, int(round(channels * check_width(width))))

"""How much of each answer a recording keeps for replay (masked), for every protocol."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleLimits:
    rows: int = 10                 # rows kept per statement
    bytes: int = 4096              # rendered bytes kept per statement
    session_bytes: int = 1 << 20   # all samples of a session; then only counts are kept

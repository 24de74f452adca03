"""Masking: column rules and content detectors applied to result values as they stream.

Pure functions over values; the protocol layers decide where values are. A value that
can't be inspected (e.g. not UTF-8 in a text column) is masked whole rather than passed:
masking fails closed.
"""
from __future__ import annotations

import fnmatch
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

from hostagent.masking.prefilter import Prefilter, compiled, might_match

MASK = "****"


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)   # a digit doubled, its digits summed


def _luhn(digits: str) -> bool:
    rev = digits[::-1]
    return (sum(map(int, rev[0::2])) + sum(_DOUBLED[int(c)] for c in rev[1::2])) % 10 == 0


def _card(match: re.Match) -> bool:
    digits = re.sub(r"[ -]", "", match.group(0))
    return 13 <= len(digits) <= 19 and _luhn(digits)


# name -> (pattern, extra check)
DETECTORS: dict[str, tuple[re.Pattern, object]] = {
    # (the lookbehind starts a match only where a run of address characters starts: a
    # long run without "@" is then one failed attempt, not one per character)
    "email": (re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), None),
    "credit_card": (re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), _card),
    "us_ssn": (re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), None),
    "phone": (re.compile(r"(?<![\w])(?:\+?\d{1,3}[ .-]?)?\(?\d{3}\)?[ .-]?\d{3}[ .-]?\d{4}(?![\w])"), None),
    "aws_access_key": (re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"), None),
    # (starts only where a run of token characters starts, as for email: "eyJ-eyJ-..."
    # is one attempt, not one per "eyJ")
    "jwt": (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), None),
    # (a key ends before the next BEGIN: many BEGINs without an END cost one pass, not
    # one pass each)
    "pem_private_key": (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:(?!-----BEGIN )[\s\S])*?-----END [A-Z ]*PRIVATE KEY-----"), None),
    "bearer_token": (re.compile(r"\b(?i:bearer)\s+[A-Za-z0-9._~+/-]{16,}=*"), None),
}


CACHED_VALUE = 256      # bytes: values up to this long have their scan remembered
CACHED_VALUES = 1024    # per session; then the memory starts afresh (≤ ~0.6 MB)


@dataclass(frozen=True)
class MaskRule:
    name: str
    columns: tuple[str, ...] = ()      # "table.column" or "column", globs
    detectors: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    json: tuple[str, ...] = ()         # JSON paths in HTTP answers: "$.users[*].email"


@dataclass
class Masker:
    """Masks for one session (rules already narrowed to its target)."""
    rules: tuple[MaskRule, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return any(r.columns or r.detectors for r in self.rules)

    def column_masked(self, table: str, column: str) -> str | None:
        """The rule that masks this column whole, if any."""
        names = [column.lower()] + ([f"{table.lower()}.{column.lower()}"] if table else [])
        for r in self.rules:
            for pattern in r.columns:
                p = pattern.lower()
                if any(fnmatch.fnmatchcase(n, p) for n in names) or (
                        p.startswith("*.") and fnmatch.fnmatchcase(column.lower(), p[2:])):
                    return r.name
        return None

    def __post_init__(self) -> None:
        # Detectors without an extra check run as one alternation (one pass per value);
        # a checked one (cards: Luhn) runs alone, since a candidate it rejects must not
        # hide what another detector would find in the same characters.
        self._groups: dict[str, tuple[str, str]] = {}
        parts = []
        self._checked: list[tuple[str, str, re.Pattern, object]] = []
        for r in self.rules:
            for name in r.detectors:
                pattern, check = DETECTORS[name]
                if check is not None:
                    self._checked.append((r.name, name, pattern, check))
                    continue
                group = f"g{len(self._groups)}"
                self._groups[group] = (r.name, name)
                parts.append(f"(?P<{group}>{pattern.pattern})")
        self._combined = re.compile("|".join(parts)) if parts else None
        # Could any detector match? Asked of each value before any rewriting, in one
        # pass over its bytes (prefilter.py); a value that can't is passed on untouched.
        self.detectors = frozenset(n for r in self.rules for n in r.detectors)
        self.prefilter = compiled(Prefilter.for_detectors(self.detectors))
        self._active = bool(self.detectors)
        # Values scanned, with what the scan made of them and the detectors it counted:
        # columns repeat values (a status, a default), and a hit costs a substitution
        self._seen: dict[bytes, tuple[bytes, tuple[tuple[str, int], ...]]] = {}
        self._trace: list[str] | None = None

    def _hit(self, rule: str, name: str) -> str:
        key = sys.intern(f"{rule}:{name}")
        self.counts[key] = self.counts.get(key, 0) + 1
        if self._trace is not None:
            self._trace.append(key)
        return MASK

    def scan(self, text: str) -> tuple[str, int]:
        """Apply every detector of every rule to a text value."""
        hits = 0
        for rule, name, pattern, check in self._checked:
            def checked(m: re.Match, rule=rule, name=name, check=check) -> str:
                nonlocal hits
                if not check(m):
                    return m.group(0)
                hits += 1
                return self._hit(rule, name)
            text = pattern.sub(checked, text)
        if self._combined is not None:
            def combined(m: re.Match) -> str:
                nonlocal hits
                hits += 1
                return self._hit(*self._groups[m.lastgroup])
            text = self._combined.sub(combined, text)
        return text, hits

    def scan_bytes(self, value: bytes) -> bytes:
        """scan() for a value as the server sent it (UTF-8); UnicodeDecodeError if it
        is not text: the caller masks it whole."""
        if not self._active or not might_match(value, self.prefilter):
            return value
        seen = self._seen.get(value)
        if seen is not None:
            counts = self.counts
            for key, n in seen[1]:
                counts[key] = counts.get(key, 0) + n
            return seen[0]
        trace = self._trace = [] if len(value) <= CACHED_VALUE else None
        try:
            if value.isascii():
                out = self.scan(value.decode("ascii"))[0].encode("ascii")
            else:
                out = self.scan(value.decode())[0].encode()
        finally:
            self._trace = None
        if trace is not None:
            if len(self._seen) >= CACHED_VALUES:
                self._seen.clear()
            # (how many hits of each detector, not a key per hit: values full of
            # addresses must not make the memory big)
            self._seen[value] = (out, tuple(Counter(trace).items()))
        return out

    def column_masked_anywhere(self, column: str) -> str | None:
        """The rule masking a column of this name in any table (for values whose table
        the server does not name)."""
        name = column.lower()
        for r in self.rules:
            for pattern in r.columns:
                if fnmatch.fnmatchcase(name, pattern.lower().rsplit(".", 1)[-1]):
                    return r.name
        return None

    def table_may_hold(self, table: str) -> bool:
        """Whether a column rule could mask a column of a table of this (bare) name: a
        rule naming no table, or one whose table part matches."""
        name = table.lower()
        for r in self.rules:
            for pattern in r.columns:
                parts = pattern.lower().split(".")
                if len(parts) == 1 or fnmatch.fnmatchcase(name, parts[-2]):
                    return True
        return False

    def count_column(self, rule: str) -> None:
        key = f"{rule}:column"
        self.counts[key] = self.counts.get(key, 0) + 1

    @property
    def column_rules(self) -> bool:
        return any(r.columns for r in self.rules)

    @property
    def has_detectors(self) -> bool:
        return any(r.detectors for r in self.rules)


def for_target(rules: tuple[MaskRule, ...], target: str) -> Masker:
    return Masker(tuple(r for r in rules
                        if not r.targets or any(fnmatch.fnmatchcase(target, t) for t in r.targets)))

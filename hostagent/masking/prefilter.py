"""Which values the detectors need not look at: a necessary condition per detector,
checked over the bytes in one pass, so the regular expressions run only on values that
might hold a match (most values of most columns hold none).

Each condition is implied by its detector's pattern (tests/hostagent/masking/
test_prefilter.py holds every detector to it): an e-mail has an `@`; a card number, a
phone number and an SSN are runs of at least 13, 10 and 9 ASCII digits with at most two
separators from ` -.()+` between digits; the keys and tokens contain a literal (AKIA,
ASIA, eyJ, PRIVATE KEY-----, bearer in any case). Only ASCII values are judged: others
(Unicode digits match `\\d`) always go to the detectors. A detector without a condition
here sends every value to them.

`_prefilter.pyx` is `py_might_match` compiled (built by `make setup`); tests hold the
two identical.
"""
from __future__ import annotations

from dataclasses import dataclass

DIGIT_RUNS = {"credit_card": 13, "phone": 10, "us_ssn": 9}
LITERALS = {"aws_access_key": (b"AKIA", b"ASIA"), "jwt": (b"eyJ",),
            "pem_private_key": (b"PRIVATE KEY-----",)}
SEPARATORS = b" -.()+"


@dataclass(frozen=True)
class Prefilter:
    at: bool = False                   # an `@` may start a match
    digits: int = 0                    # a digit run this long may (0: no digit detector)
    literals: tuple[bytes, ...] = ()
    bearer: bool = False
    always: bool = False               # a detector with no condition here

    @classmethod
    def for_detectors(cls, names) -> "Prefilter":
        names = set(names)
        runs = [DIGIT_RUNS[n] for n in names if n in DIGIT_RUNS]
        known = {"email", "bearer_token"} | DIGIT_RUNS.keys() | LITERALS.keys()
        return cls(at="email" in names, digits=min(runs) if runs else 0,
                   literals=tuple(lit for n in sorted(names) for lit in LITERALS.get(n, ())),
                   bearer="bearer_token" in names, always=bool(names - known))


def py_might_match(value: bytes, p: Prefilter) -> bool:
    """False only if no detector of `p` can match the text of `value`."""
    if p.always or not value.isascii():
        return True
    if p.at and b"@" in value:
        return True
    for lit in p.literals:
        if lit in value:
            return True
    if p.bearer and b"bearer" in value.lower():
        return True
    if p.digits:
        run = gap = 0
        for c in value:
            if 48 <= c <= 57:
                run += 1
                gap = 0
                if run >= p.digits:
                    return True
            elif c in SEPARATORS and run and gap < 2:
                gap += 1
            else:
                run = gap = 0
    return False


try:
    # (compiled(p): p as the compiled might_match reads it fastest, made once per session)
    from hostagent.masking._prefilter import Spec as compiled, might_match
    COMPILED = True
except ImportError:   # not built (a source checkout without `make setup`)
    might_match = py_might_match
    COMPILED = False

    def compiled(p: Prefilter) -> Prefilter:
        return p

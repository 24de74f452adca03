"""Policy: ordered rules from a TOML file, and a pure decision function.

(identity, target, protocol, database, statement) in, Decision out: no I/O, no clock,
so the proxy can call it inline and `agentgate policy explain` can show exactly what
the proxy would do. Every decision names the rule that made it.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from agentgate.tomlconfig import ConfigError, Section, read_toml

ACTIONS = ("allow", "deny", "review")
DEFAULT_RULE = "(default)"
UNPARSEABLE_RULE = "(unparseable)"


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    reason: str = ""
    targets: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    exes: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    cgroups: tuple[str, ...] = ()
    databases: tuple[str, ...] = ()
    statements: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    match: re.Pattern | None = None


@dataclass(frozen=True)
class Policy:
    default: str = "allow"
    unparseable: str = "deny"
    audit: bool = False               # decide and record, but never block
    rules: tuple[Rule, ...] = ()
    review_ttl_s: int = 0             # how long a held statement waits (0: the collector's)
    masks: tuple = ()                 # hostagent.masking.MaskRule


@dataclass(frozen=True)
class Request:
    """What a decision looks at. `statement` is None for text that did not parse."""
    target: str
    protocol: str
    identity: dict = field(default_factory=dict)
    database: str = ""
    text: str = ""
    kinds: frozenset[str] = frozenset()
    tables: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    flags: frozenset[str] = frozenset()
    parsed: bool = True


@dataclass(frozen=True)
class Decision:
    action: str          # what is done: allow | deny | review
    rule: str
    reason: str
    would: str = ""      # in audit mode: what the policy would have done

    def as_dict(self) -> dict:
        d = {"action": self.action, "rule": self.rule, "reason": self.reason}
        if self.would:
            d["would"] = self.would
        return d


def _any(patterns: tuple[str, ...], values) -> bool:
    values = [v for v in values if v]
    return any(fnmatch.fnmatchcase(v.lower(), p.lower()) for p in patterns for v in values)


def _matches(rule: Rule, req: Request) -> bool:
    ident = req.identity
    checks = [
        (rule.targets, [req.target]), (rule.protocols, [req.protocol]),
        (rule.users, [str(ident.get("user", "")), str(ident.get("uid", ""))]),
        (rule.exes, [str(ident.get("exe") or "")]), (rule.units, [str(ident.get("unit") or "")]),
        (rule.cgroups, [str(ident.get("cgroup") or "")]), (rule.databases, [req.database]),
        (rule.statements, list(req.kinds)), (rule.tables, list(req.tables)),
        (rule.functions, list(req.functions)), (rule.flags, list(req.flags)),
    ]
    for patterns, values in checks:
        if patterns and not _any(patterns, values):
            return False
    if rule.match is not None and not rule.match.search(normalize(req.text)):
        return False
    return True


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def decide(policy: Policy, req: Request) -> Decision:
    if not req.parsed:
        decision = Decision(policy.unparseable, UNPARSEABLE_RULE,
                            "the statement could not be parsed")
    else:
        decision = next((Decision(r.action, r.name, r.reason) for r in policy.rules
                         if _matches(r, req)),
                        Decision(policy.default, DEFAULT_RULE, "no rule matched"))
    if policy.audit and decision.action != "allow":
        return Decision("allow", decision.rule, decision.reason, would=decision.action)
    return decision


# ---------------------------------------------------------------- loading

_LISTS = ("targets", "protocols", "users", "exes", "units", "cgroups", "databases",
          "statements", "tables", "functions", "flags")


def _rule(sec: Section, seen: set[str]) -> Rule:
    name = sec.get("name", str, "")
    if not name:
        raise ConfigError(f"{sec.where}: a rule needs a 'name'")
    where = f"{sec.where.rsplit(' ', 1)[0]} rule '{name}'"
    if name in seen:
        raise ConfigError(f"{where}: the name is used twice")
    seen.add(name)
    action = sec.get("action", str, "")
    if action not in ACTIONS:
        raise ConfigError(f"{where}: 'action' must be one of {', '.join(ACTIONS)}")
    fields = {}
    for key in _LISTS:
        value = sec.get(key, (list, str), [])
        value = [value] if isinstance(value, str) else value
        if not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: '{key}' must be a list of strings")
        fields[key] = tuple(value)
    fields["statements"] = tuple(s.upper() for s in fields["statements"])
    pattern = sec.get("match", str, None)
    try:
        compiled = re.compile(pattern, re.IGNORECASE) if pattern else None
    except re.error as exc:
        raise ConfigError(f"{where}: 'match' is not a valid regex: {exc}") from None
    rule = Rule(name=name, action=action, reason=sec.get("reason", str, ""), match=compiled,
                **fields)
    sec.done()
    return rule


def load_policy(path: str) -> Policy:
    root = Section(read_toml(path), str(path))
    default = root.get("default", str, "allow")
    unparseable = root.get("unparseable", str, "deny")
    for key, value in (("default", default), ("unparseable", unparseable)):
        if value not in ACTIONS:
            raise ConfigError(f"{path}: '{key}' must be one of {', '.join(ACTIONS)}")
    seen: set[str] = set()
    rules = tuple(_rule(r, seen) for r in root.tables("rules"))
    masks = tuple(_mask(m) for m in root.tables("masks"))
    audit = root.get("audit", bool, False)
    ttl = root.get("review_ttl_seconds", int, 0)
    root.done()
    return Policy(default=default, unparseable=unparseable, audit=audit, rules=rules,
                  review_ttl_s=ttl, masks=masks)


def _mask(sec: Section):
    from hostagent.masking import DETECTORS, MaskRule
    name = sec.get("name", str, "")
    if not name:
        raise ConfigError(f"{sec.where}: a mask needs a 'name'")
    columns = tuple(sec.get("columns", list, []))
    detectors = tuple(sec.get("detectors", list, []))
    targets = tuple(sec.get("targets", list, []))
    sec.done()
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ConfigError(f"{sec.where} mask '{name}': unknown detector '{unknown[0]}' "
                          f"(known: {', '.join(DETECTORS)})")
    if not columns and not detectors:
        raise ConfigError(f"{sec.where} mask '{name}': give 'columns' or 'detectors'")
    return MaskRule(name=name, columns=columns, detectors=detectors, targets=targets)

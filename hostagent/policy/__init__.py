"""Policy: ordered rules from a TOML file, and a pure decision function.

A protocol-neutral Request (target, protocol, the kernel's identity, an action, the
resources it touches, named attributes) in, Decision out: no I/O, no clock, so the
proxy can call it inline and `agentgate policy explain` can show exactly what the proxy
would do. Every decision names the rule that made it.

A rule's matchers are the generic ones (targets, protocols, users, exes, units,
cgroups, match) plus those its protocols declare (PostgreSQL: databases, statements,
tables, functions, flags); a protocol's Request carries its values under the same names
in `attributes`. A rule naming a matcher no protocol has is refused at load.

What can't be known. A request the protocol could not parse (`parsed=False`) takes the
policy's `unparseable` decision, whatever the rules say. A request that parsed but runs
something whose effect can't be known from its text names why in `unknown` (PostgreSQL:
`dynamic_sql` for SQL computed when it runs, `untrusted_language` for code in a language
we can't read, `changes_parsing` for settings after which the server reads texts
differently from us). The rules judge what is known as usual; then, unless the first rule that
matches is an allow rule whose `flags` names each of those explicitly (the exact flag,
not a glob), the stricter of that decision and `unparseable` is taken. So with
`unparseable = "deny"`, computed dynamic SQL is refused unless, e.g.,

    [[rules]]
    name = "migrations-may-run-dynamic-sql"
    action = "allow"
    users = ["migrator"]
    flags = ["dynamic_sql"]

comes first among the rules that match it.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Mapping

from agentgate.tomlconfig import ConfigError, Section, read_toml
from hostagent.protocols import registry

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
    match: re.Pattern | None = None
    # protocol matchers: (name, patterns), checked against Request.attributes[name]
    matchers: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def fields(self) -> set[str]:
        return {name for name, _ in self.matchers}


@dataclass(frozen=True)
class Policy:
    default: str = "allow"
    unparseable: str = "deny"
    audit: bool = False               # decide and record, but never block
    rules: tuple[Rule, ...] = ()
    review_ttl_s: int = 0             # how long a held statement waits (0: the collector's)
    masks: tuple = ()                 # hostagent.masking.MaskRule


@dataclass(frozen=True, slots=True)
class Request:
    """What a decision looks at. `parsed` is False for input that could not be parsed:
    it takes the policy's `unparseable` decision, whatever the rules say. `unknown`
    names (as flags) what it runs that can't be known from its text: see the module's
    docstring."""
    target: str
    protocol: str
    identity: Mapping = field(default_factory=dict)
    action: str = ""                        # what it does, for people (kinds, a method)
    resources: tuple[str, ...] = ()         # what it acts on (tables, paths, pods)
    attributes: Mapping[str, object] = field(default_factory=dict)   # matcher -> values
    text: str = ""
    parsed: bool = True
    unknown: tuple[str, ...] = ()
    # attributes whose values are readings of one thing (HTTP paths as servers may read
    # them): a deny or review rule matches if any reading does, an allow rule only if
    # every reading does
    readings: tuple[str, ...] = ()


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
    match = fnmatch.fnmatchcase
    for v in values:
        if v:
            v = v.lower()
            for p in patterns:
                if match(v, p.lower()):
                    return True
    return False


def _matches(rule: Rule, req: Request) -> bool:
    # (every statement is judged: only the checks a rule has are built)
    if rule.targets and not _any(rule.targets, (req.target,)):
        return False
    if rule.protocols and not _any(rule.protocols, (req.protocol,)):
        return False
    if rule.users or rule.exes or rule.units or rule.cgroups:
        ident = req.identity
        for patterns, values in (
                (rule.users, (str(ident.get("user", "")), str(ident.get("uid", "")))),
                (rule.exes, (str(ident.get("exe") or ""),)),
                (rule.units, (str(ident.get("unit") or ""),)),
                (rule.cgroups, (str(ident.get("cgroup") or ""),))):
            if patterns and not _any(patterns, values):
                return False
    attrs = req.attributes
    for name, patterns in rule.matchers:
        values = attrs.get(name, ())
        if rule.action == "allow" and name in req.readings and values:
            if not all(_any(patterns, (v,)) for v in values):
                return False
        elif not _any(patterns, values):
            return False
    if rule.match is not None and not rule.match.search(normalize(req.text)):
        return False
    return True


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


_RANK = {"allow": 0, "review": 1, "deny": 2}


def _allows_unknown(rule: Rule | None, unknown: tuple[str, ...]) -> bool:
    """An allow rule that names each of these flags itself (not through a glob)."""
    if rule is None or rule.action != "allow":
        return False
    named = {p.lower() for name, patterns in rule.matchers if name == "flags" for p in patterns}
    return all(flag.lower() in named for flag in unknown)


def decide(policy: Policy, req: Request) -> Decision:
    if not req.parsed:
        decision = Decision(policy.unparseable, UNPARSEABLE_RULE,
                            "the statement could not be parsed")
    else:
        rule = next((r for r in policy.rules if _matches(r, req)), None)
        decision = (Decision(rule.action, rule.name, rule.reason) if rule is not None else
                    Decision(policy.default, DEFAULT_RULE, "no rule matched"))
        if req.unknown and not _allows_unknown(rule, req.unknown):
            named = ", ".join(f'"{f}"' for f in req.unknown)
            unknown = Decision(policy.unparseable, UNPARSEABLE_RULE,
                               f"what it runs can't be known from its text "
                               f"({', '.join(req.unknown)}); only an allow rule with "
                               f"flags = [{named}] lets it through")
            if _RANK[unknown.action] > _RANK[decision.action]:
                decision = unknown
    if policy.audit and decision.action != "allow":
        return Decision("allow", decision.rule, decision.reason, would=decision.action)
    return decision


# ---------------------------------------------------------------- loading

_GENERIC = ("targets", "protocols", "users", "exes", "units", "cgroups")


def _patterns(sec: Section, key: str, where: str) -> tuple[str, ...]:
    value = sec.get(key, (list, str), [])
    value = [value] if isinstance(value, str) else value
    if not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of strings")
    return tuple(value)


def _matcher(sec: Section, key: str, where: str) -> list[tuple[str, tuple[str, ...]]]:
    """A matcher's (name, patterns); a table matcher is one entry per field, so that
    every field of it must match."""
    value = sec.data.get(key)
    if isinstance(value, dict):
        sec.get(key, dict)
        make = next((spec.table_matchers[key] for spec in registry.all_specs()
                     if key in spec.table_matchers), None)
        if make is None:
            raise ConfigError(f"{where}: '{key}' must be a list of strings")
        if not value or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: '{key}' must be a table of field = glob strings")
        return [(key, (p,)) for p in make(value)]
    return [(key, _patterns(sec, key, where))]


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
    fields = {key: _patterns(sec, key, where) for key in _GENERIC}
    unknown = [p for p in fields["protocols"] if p not in registry.PROTOCOLS]
    if unknown:
        raise ConfigError(f"{where}: unknown protocol {unknown[0]!r} "
                          f"(known: {', '.join(registry.names())})")
    known = {f for spec in registry.all_specs() for f in spec.policy_fields}
    matchers = tuple(m for key in sorted(known) if key in sec.data
                     for m in _matcher(sec, key, where))
    extra = sorted(set(sec.data) - known - set(_GENERIC) - {"name", "action", "reason", "match"})
    if extra:
        raise ConfigError(f"{where}: unknown matcher '{extra[0]}' (matchers: "
                          f"{', '.join(sorted(set(_GENERIC) | known | {'match'}))})")
    pattern = sec.get("match", str, None)
    try:
        compiled = re.compile(pattern, re.IGNORECASE) if pattern else None
    except re.error as exc:
        raise ConfigError(f"{where}: 'match' is not a valid regex: {exc}") from None
    rule = Rule(name=name, action=action, reason=sec.get("reason", str, ""), match=compiled,
                matchers=matchers, **fields)
    sec.done()
    _check_protocols(rule, where, list(rule.protocols) or registry.names())
    return rule


def _check_protocols(rule: Rule, where: str, protocols: list[str]) -> None:
    """A rule applies only to protocols that can answer all its matchers; if none of
    those it may apply to can, it would never match: a mistake, said at load."""
    wanted = rule.fields()
    if not wanted:
        return
    supported = registry.supported_fields(protocols)
    if not any(wanted <= have for have in supported.values()):
        missing = sorted(wanted - set().union(*supported.values())) or sorted(wanted)
        raise ConfigError(f"{where}: matcher '{missing[0]}' is supported by none of its "
                          f"protocols ({', '.join(sorted(protocols))})")


def check_against_targets(policy: Policy, targets: dict[str, str], where: str) -> None:
    """Each rule against the protocols of the targets it can apply to (name -> protocol)."""
    for rule in policy.rules:
        names = [t for t in targets if not rule.targets or _any(rule.targets, [t])]
        protocols = sorted({targets[t] for t in names if not rule.protocols
                            or targets[t] in rule.protocols})
        if protocols:
            _check_protocols(rule, f"{where} rule '{rule.name}'", protocols)
            if rule.targets and not any(registry.get(p).judges for p in protocols):
                raise ConfigError(f"{where} rule '{rule.name}': it can apply only to targets "
                                  f"relayed raw ({', '.join(protocols)}), which no rule "
                                  f"judges")


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
    json_paths = tuple(sec.get("json", list, []))
    bad = [p for p in json_paths if not isinstance(p, str) or not p.startswith("$")]
    if bad:
        raise ConfigError(f"{sec.where} mask '{name}': json paths start with '$' "
                          f"(e.g. \"$.users[*].email\"), not {bad[0]!r}")
    detectors = tuple(sec.get("detectors", list, []))
    targets = tuple(sec.get("targets", list, []))
    sec.done()
    unknown = [d for d in detectors if d not in DETECTORS]
    if unknown:
        raise ConfigError(f"{sec.where} mask '{name}': unknown detector '{unknown[0]}' "
                          f"(known: {', '.join(DETECTORS)})")
    if not columns and not detectors and not json_paths:
        raise ConfigError(f"{sec.where} mask '{name}': give 'columns', 'json' or 'detectors'")
    return MaskRule(name=name, columns=columns, detectors=detectors, targets=targets,
                    json=json_paths)

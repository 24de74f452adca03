"""The one place protocols are registered. Each is a folder under hostagent/protocols
whose __init__ declares `PROTOCOL = ProtocolSpec(...)`: its name, its target options,
its layer factory (or a serve() coroutine where a library owns the wire), whether it
needs the local CA and the policy fields it supports. Adding a protocol is a folder
and one line below; the driver never changes for it.

Declarations are imported lazily: reading a config must not pull in every parser.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from agentgate.tomlconfig import ConfigError, Section

PROTOCOLS: dict[str, str] = {
    "tcp": "hostagent.protocols.tcp",
    "postgres": "hostagent.protocols.postgres",
    "http": "hostagent.protocols.http",
    "https": "hostagent.protocols.http.tls",
    "kubernetes": "hostagent.protocols.kubernetes",
    "ssh": "hostagent.protocols.ssh",
    "mysql": "hostagent.protocols.mysql",
}

@dataclass(frozen=True)
class Option:
    """One target option: checked at load, with one-line errors naming file and target."""
    name: str
    type: type = str
    default: Any = None
    choices: tuple = ()
    path: bool = False        # relative to the config file's folder
    help: str = ""


class Options(Mapping):
    """A target's protocol options, read-only, also as attributes (`opts.tls`)."""

    def __init__(self, values: dict):
        object.__setattr__(self, "_v", dict(values))

    def __getattr__(self, name: str):
        try:
            return self._v[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("target options are read-only")

    def __getitem__(self, key):
        return self._v[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._v)

    def __len__(self) -> int:
        return len(self._v)

    def replace(self, **changes) -> "Options":
        return Options({**self._v, **changes})

    def __repr__(self) -> str:   # secrets are never shown
        return "Options(" + ", ".join(f"{k}={'***' if 'password' in k or 'secret' in k else v!r}"
                                      for k, v in self._v.items()) + ")"


@dataclass(frozen=True)
class ProtocolSpec:
    name: str
    summary: str
    options: tuple[Option, ...] = ()
    layer: Callable | None = None        # SessionContext -> Layer (sans-IO)
    serve: Callable | None = None        # async (SessionContext, api.Wire) -> end reason
    needs_ca: Callable[[Options], bool] = lambda opts: False
    policy_fields: tuple[str, ...] = ()  # rule matchers beyond the generic ones (policy)
    # matchers written as a table (HTTP's json = {"$.path" = "glob"}): its patterns, one
    # per entry; every entry must match
    table_matchers: dict = field(default_factory=dict)
    idle_timeout: float = 3600.0         # seconds without a byte either way
    judges: bool = True                  # consults the policy (tcp: a raw relay, never)
    check: Callable[[Options, str], None] | None = None     # cross-option rules at load
    prepare: Callable[[Options, str], Options] | None = None  # at start: read secrets
    # at start, while the BPF programs compile: import the layer and warm its parsers, so
    # the first session (and its first statement) does not wait for them
    warm: Callable[[], None] | None = None
    # at start, once for the protocol's targets: host-wide state its sessions share (SSH:
    # the proxy's certified host key), given to them as SessionContext.service. It may
    # have env() (what agents' environments get) and unpublish() (undone at stop).
    setup: Callable[[list, Any, str], Any] | None = None    # (targets, state_dir, tree)
    fields: dict = field(default_factory=dict)               # documentation only


def names() -> list[str]:
    return sorted(PROTOCOLS)


def get(name: str) -> ProtocolSpec:
    try:
        module = PROTOCOLS[name]
    except KeyError:
        raise ConfigError(f"unknown protocol {name!r} (known: {', '.join(names())})") from None
    return importlib.import_module(module).PROTOCOL


def all_specs() -> list[ProtocolSpec]:
    return [get(n) for n in names()]


def parse_options(spec: ProtocolSpec, sec: Section, where: str) -> Options:
    """Read the protocol's options from a [[targets]] table; anything else in it is an
    error (Section.done, called by the caller once the generic keys are read too)."""
    values = {}
    for opt in spec.options:
        value = sec.path(opt.name, opt.default) if opt.path else \
            sec.get(opt.name, opt.type, opt.default)
        if opt.choices and value not in opt.choices:
            raise ConfigError(f"{where}: '{opt.name}' must be {_either(opt.choices)}, "
                              f"not {value!r}")
        values[opt.name] = value
    opts = Options(values)
    if spec.check:
        spec.check(opts, where)
    return opts


def _either(choices: tuple) -> str:
    items = [str(c) for c in choices]
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else items[0]


def supported_fields(protocols: list[str]) -> dict[str, set[str]]:
    """Which protocol matchers each protocol can answer (the generic ones, all can)."""
    return {p: set(get(p).policy_fields) for p in protocols}

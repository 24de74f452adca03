"""Kubernetes API requests that run something in a pod: exec, attach, port-forward, an
ephemeral container, a node's proxy. What policy sees of them (namespace, pod,
container, the command line, stdin/tty) comes from the request alone, before any
upgrade: nothing has started in the pod when it is judged."""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

_POD = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/(exec|attach|portforward)")
_EPHEMERAL = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/ephemeralcontainers")
_NODE_PROXY = re.compile(r"/api/v1/nodes/([^/]+)/proxy(/.*)?")
_NAMESPACED = re.compile(r"/apis?/(?:[^/]+/)*?namespaces/([^/]+)(?:/([^/]+)/([^/]+))?")


@dataclass(frozen=True)
class Exec:
    kind: str                    # exec | attach | portforward | ephemeral | nodeproxy
    namespace: str
    pod: str
    container: str = ""
    command: tuple[str, ...] = ()
    stdin: bool = False
    tty: bool = False
    others: tuple[str, ...] = ()     # more command lines (several ephemeral containers)

    @property
    def line(self) -> str:
        """The command line as policy globs see it (arguments joined by spaces)."""
        return " ".join(self.command)

    @property
    def lines(self) -> tuple[str, ...]:
        """Every command line it runs (`commands` matches any)."""
        return tuple(x for x in (self.line, *self.others) if x)

    @property
    def text(self) -> str:
        where = f"{self.namespace}/{self.pod}" + (f" [{self.container}]" if self.container else "")
        what = self.line or self.kind
        return f"{self.kind} {where}: {what}" if self.line else f"{self.kind} {where}"


def _flag(params: list[tuple[str, str]], name: str) -> bool:
    return any(k == name and v.lower() in ("1", "true", "yes") for k, v in params)


def parse_exec(method: str, path: str, query: str, body_fields) -> Exec | None:
    """The exec-like action a request is, or None (an ordinary API call)."""
    params = parse_qsl(query, keep_blank_values=True)
    m = _POD.fullmatch(path)
    if m:
        ns, pod, kind = m.groups()
        command = tuple(v for k, v in params if k == "command")
        if kind == "portforward":
            command = tuple(f"port {v}" for k, v in params if k == "ports")
        container = next((v for k, v in params if k == "container"), "")
        return Exec(kind, ns, pod, container, command, _flag(params, "stdin"),
                    _flag(params, "tty"))
    m = _EPHEMERAL.fullmatch(path)
    if m and method in ("PATCH", "PUT", "POST"):
        # the ephemeral containers' command and args, as they will run
        cmds: dict[str, list[str]] = {}
        for field, value in body_fields or ():
            em = re.match(r"\$\.spec\.ephemeralcontainers\[(\d+)\]\.(command|args)\[\d+\]$",
                          field)
            if em:
                cmds.setdefault(em.group(1), []).append(value)
        lines = [v for v in cmds.values()] or [["(ephemeral container)"]]
        return Exec("ephemeral", m.group(1), m.group(2), "", tuple(lines[0]),
                    others=tuple(" ".join(v) for v in lines[1:]))
    m = _NODE_PROXY.fullmatch(path)
    if m:
        return Exec("nodeproxy", "", m.group(1), "", (f"{method} {m.group(2) or '/'}",))
    return None


def namespaced(path: str) -> tuple[str, str]:
    """(namespace, pod) an ordinary API path names, if any."""
    m = _NAMESPACED.match(path)
    if not m:
        return "", ""
    ns, kind, name = m.groups()
    return ns, name if kind == "pods" and name else ""

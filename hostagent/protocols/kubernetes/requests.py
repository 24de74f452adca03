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
    # as the API server converts it: the first value, true unless "0" or "false"
    values = [v for k, v in params if k == name]
    return bool(values) and values[0].strip().lower() not in ("0", "false")


# a query Go's url.ParseQuery reads otherwise (it drops pairs with a bad escape or a
# semicolon): the command it runs would not be the one judged
_ODD_QUERY = re.compile(r";|%(?![0-9A-Fa-f]{2})")
_RUNS = frozenset(("exec", "attach", "portforward", "ephemeralcontainers", "proxy", "run"))
_KUBELET = re.compile(r"/(exec|run|attach|portforward)/([^/]+)/([^/]+)(?:/([^/]+))?(?:/.*)?",
                      re.I)


class Unjudgeable(ValueError):
    """A request that runs something, in a form whose command can't be known."""


def parse_exec(method: str, path: str, query: str, body_fields, *,
               content_type: str = "") -> Exec | None:
    """The exec-like action a request is, or None (an ordinary API call). Unjudgeable
    for one that runs something in a form that can't be read as the server will."""
    # (the API server trims slashes and merges empty segments before it routes)
    path = "/" + "/".join(seg for seg in path.split("/") if seg)
    runs = _RUNS & {seg.lower() for seg in path.split("/")}
    if runs and _ODD_QUERY.search(query):
        raise Unjudgeable("a query the API server reads otherwise (';' or a bad escape)")
    params = parse_qsl(query, keep_blank_values=True)
    m = _POD.fullmatch(path)
    if m:
        ns, pod, kind = m.groups()
        command = tuple(v for k, v in params if k == "command")
        if kind == "portforward":
            # (the kubelet splits `ports` at commas and reads each as a decimal number)
            ports = [p.strip() for k, v in params if k == "ports" for p in v.split(",")]
            if not all(p.isascii() and p.isdigit() for p in ports):
                raise Unjudgeable(f"a port that is not a number: {ports}")
            # (each port its own line: a `commands` glob judges each)
            lines = [f"port {int(p)}" for p in ports]
            return Exec(kind, ns, pod, "", tuple(lines[:1]), others=tuple(lines[1:]))
        container = next((v for k, v in params if k == "container"), "")
        return Exec(kind, ns, pod, container, command, _flag(params, "stdin"),
                    _flag(params, "tty"))
    m = _EPHEMERAL.fullmatch(path)
    if m and method in ("PATCH", "PUT", "POST"):
        return _ephemeral(m.group(1), m.group(2), body_fields, content_type)
    m = _NODE_PROXY.fullmatch(path)
    if m:
        rest = m.group(2) or "/"
        k = _KUBELET.fullmatch(rest)
        if k:    # the kubelet's own exec/run/attach endpoints, behind the node's proxy
            kind, ns, pod, container = k.groups()
            if kind.lower() == "portforward":
                ports = [p.strip() for key, v in params if key in ("port", "ports")
                         for p in v.split(",")]
                if not all(p.isascii() and p.isdigit() for p in ports):
                    raise Unjudgeable(f"a port that is not a number: {ports}")
                lines = [f"port {int(p)}" for p in ports] or ["portforward"]
                # (its streams' ports are judged as they open, as for a pod's)
                return Exec("portforward", ns, pod, "", tuple(lines[:1]),
                            others=tuple(lines[1:]))
            command = tuple(v for key, v in params if key in ("command", "cmd"))
            command += tuple(v for key, v in (body_fields or ()) if key in ("$.cmd",))
            return Exec("nodeproxy", ns, pod, container or "", command or (kind.lower(),),
                        _flag(params, "input") or _flag(params, "stdin"),
                        _flag(params, "tty"))
        return Exec("nodeproxy", "", m.group(1), "", (f"{method} {rest}",))
    if runs & {"exec", "attach", "portforward", "ephemeralcontainers"}:
        # a path that names one of them but is not a form we know: not guessed
        raise Unjudgeable(f"an API path that runs something, in an unknown form: {path}")
    return None


_PATCH_TYPES = ("application/json", "application/merge-patch+json",
                "application/strategic-merge-patch+json")


def _ephemeral(ns: str, pod: str, body_fields, content_type: str) -> Exec:
    """The ephemeral containers' command lines (command, then args, as they will run)."""
    if content_type and content_type not in _PATCH_TYPES:
        # (JSON patch operations, YAML, protobuf: their commands are not read)
        raise Unjudgeable(f"an ephemeral container in a {content_type} body")
    parts: dict[str, dict[str, list[str]]] = {}
    for field, value in body_fields or ():
        em = re.match(r"\$\.spec\.ephemeralcontainers\[(\d+)\]\.(command|args)\[\d+\]$",
                      field)
        if em:
            parts.setdefault(em.group(1), {}).setdefault(em.group(2), []).append(value)
            if "$(" in value:
                raise Unjudgeable("an ephemeral container's command expands variables")
    lines = [c.get("command", ["(the image's entrypoint)"]) + c.get("args", [])
             for c in parts.values()] or [["(ephemeral container)"]]
    return Exec("ephemeral", ns, pod, "", tuple(lines[0]),
                others=tuple(" ".join(v) for v in lines[1:]))


def namespaced(path: str) -> tuple[str, str]:
    """(namespace, pod) an ordinary API path names, if any."""
    m = _NAMESPACED.match(path)
    if not m:
        return "", ""
    ns, kind, name = m.groups()
    if kind == "pods" and name:
        # pods/http:web:8080/proxy names the pod web
        bits = name.split(":")
        name = bits[1] if len(bits) == 3 else bits[0]
        return ns, name
    return ns, ""

"""The Kubernetes layer: the HTTP layer (every API call judged, recorded, the token or
client certificate injected) where exec, attach, port-forward, ephemeral containers and
nodes/proxy are judged as commands run in a pod, refused with a v1 Status, and, once
upgraded, recorded as a terminal stream (stream.py)."""
from __future__ import annotations

from hostagent.policy import Decision, Request
from hostagent.protocols.http.bodies import media_type
from hostagent.protocols.http.layer import Exchange, HttpLayer
from hostagent.protocols.http.wire import header, tokens
from hostagent.protocols.kubernetes.requests import Unjudgeable, namespaced, parse_exec
from hostagent.protocols.kubernetes.stream import ExecStream

_REASONS = {403: "Forbidden", 405: "MethodNotAllowed", 413: "RequestEntityTooLarge",
            421: "BadRequest", 400: "BadRequest"}


class KubernetesLayer(HttpLayer):
    name = "kubernetes"
    # kubectl's remotecommand falls back to SPDY/3.1 (spdy.py reads it)
    upgrades = frozenset((b"websocket", b"spdy/3.1"))
    # (the API server's parameters are its own: exec repeats `command=`)
    query_fields = False

    def _policy_request(self, ex: Exchange) -> tuple[Request, dict]:
        req, rec = super()._policy_request(ex)
        unjudgeable = ""
        try:
            run = parse_exec(ex.method, ex.path, ex.query, ex.fields, content_type=media_type(
                header(ex.request.headers, b"content-type")))
        except Unjudgeable as exc:
            run, unjudgeable = None, str(exc)
        attrs = dict(req.attributes)
        ns, pod = namespaced(ex.path)
        attrs["namespaces"] = (ns,) if ns else ()
        attrs["pods"] = (pod,) if pod else ()
        attrs["containers"] = ()
        attrs["commands"] = ()
        unknown = req.unknown
        if run is not None:
            ex.run = run
            attrs["namespaces"] = (run.namespace,) if run.namespace else ()
            attrs["pods"] = (run.pod,)
            attrs["containers"] = (run.container,) if run.container else ()
            attrs["commands"] = run.lines or (run.kind,)
            attrs["flags"] = tuple(attrs.get("flags", ())) + (run.kind,) + \
                (("stdin",) if run.stdin else ()) + (("tty",) if run.tty else ())
            rec = {**rec, "text": run.text, "kind": run.kind, "namespace": run.namespace,
                   "pod": run.pod, "container": run.container,
                   "command": list(run.lines if run.kind == "portforward" else run.command),
                   "stdin": run.stdin, "tty": run.tty}
        if unjudgeable:
            rec = {**rec, "error": unjudgeable}
        req = Request(target=req.target, protocol=self.protocol, identity=req.identity,
                      action=run.kind if run else req.action, resources=req.resources,
                      attributes=attrs, text=run.text if run else req.text,
                      parsed=req.parsed and not unjudgeable, unknown=unknown,
                      readings=req.readings)
        return req, rec

    def _port_judge(self, run):
        """A port-forward's ports, judged as its streams name them (`commands` sees
        "port N"; a review can't be held mid-stream: it is refused)."""
        def judge(port: str):
            if not (port.strip().isascii() and port.strip().isdigit()):
                # (the kubelet reads the port as a decimal number; anything else is not
                # judged, so not let through)
                return Decision("deny", "(unparseable)", f"a port that is not a number: "
                                f"{port!r}"), {"text": f"portforward {run.namespace}/"
                                               f"{run.pod}: port {port!r}", "kind":
                                               "portforward", "port": port}
            port = str(int(port))
            req = Request(target=self.target, protocol=self.protocol, identity=self.identity,
                          action="portforward", resources=(run.pod,),
                          text=f"portforward {run.namespace}/{run.pod}: port {port}",
                          attributes={"namespaces": (run.namespace,), "pods": (run.pod,),
                                      "containers": (), "commands": (f"port {port}",),
                                      "flags": ("portforward",), "methods": (), "hosts": (),
                                      "paths": (), "headers": (), "json": ()})
            d = self.enforcer.decide(req)
            if d.action == "review":
                d = Decision("deny", d.rule, f"{d.reason} (a port opened inside a stream "
                             f"can't be held for approval)")
            return d, {"text": req.text, "kind": "portforward", "namespace": run.namespace,
                       "pod": run.pod, "port": port}
        return judge

    def _refusal_body(self, status: int, d: Decision) -> dict:
        # what kubectl and the client libraries show their users: a v1 Status
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"agentgate: refused by rule {d.rule}: {d.reason}",
                "reason": _REASONS.get(status, "Forbidden"), "code": status}

    def _upgraded(self, ev):
        spdy = b"spdy/3.1" in tokens(ev.headers, b"upgrade")
        sub = (header(ev.headers, b"x-stream-protocol-version" if spdy else
                      b"sec-websocket-protocol") or b"").decode("latin-1").strip()
        run = getattr(self.ex, "run", None)
        kind = run.kind if run is not None else "exec"
        judge = self._port_judge(run) if kind == "portforward" else None
        return ExecStream(sub, kind, spdy=spdy, judge_port=judge), \
            f"101 {kind} stream ({'SPDY/3.1 ' if spdy else ''}{sub or 'no subprotocol'})"

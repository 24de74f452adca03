"""Kubernetes API servers: the HTTPS layer, where exec, attach, port-forward, ephemeral
containers and nodes/proxy are judged as commands run in a pod (namespace, pod,
container, command line, stdin/tty) before anything starts, refused with a v1 Status,
and recorded as a terminal stream once upgraded (websocket: v5/v4/base64.channel.k8s.io).
The agent's kubeconfig holds a placeholder; the proxy injects the real bearer token or
client certificate and verifies the API server.

Modules: requests (which API calls run something, and what), stream (the upgraded
stream's channels as a recording), layer (the HTTP layer with those), setup."""
from __future__ import annotations

from agentgate.tomlconfig import ConfigError
from hostagent.protocols.http import (OPTIONS, POLICY_FIELDS, TLS_OPTIONS, _check,
                                      _prepare, json_matcher)
from hostagent.protocols.registry import Option, Options, ProtocolSpec

K8S_OPTIONS = (
    Option("client_cert", path=True, help="client certificate presented to the API server "
                                          "(root's; the agent never sees it)"),
    Option("client_key", path=True, help="its key"),
)


def _check_k8s(opts: Options, where: str) -> None:
    _check(opts, where)
    if bool(opts.client_cert) != bool(opts.client_key):
        raise ConfigError(f"{where}: give both 'client_cert' and 'client_key'")


def _layer(ctx):
    from hostagent.protocols.kubernetes.setup import layer_for
    return layer_for(ctx)


def _warm() -> None:
    import hostagent.protocols.kubernetes.layer  # noqa: F401


PROTOCOL = ProtocolSpec(
    name="kubernetes",
    summary="Kubernetes API over TLS: exec/attach/port-forward judged before they start, "
            "streams recorded, token or client certificate injected",
    options=OPTIONS + TLS_OPTIONS + K8S_OPTIONS,
    layer=_layer,
    needs_ca=lambda opts: True,
    policy_fields=POLICY_FIELDS + ("namespaces", "pods", "containers", "commands"),
    table_matchers={"json": json_matcher},
    idle_timeout=3600.0,
    check=_check_k8s,
    prepare=_prepare,
    warm=_warm,
)

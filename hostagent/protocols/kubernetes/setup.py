"""A session's Kubernetes layer from what the driver knows of it."""
from __future__ import annotations

from hostagent.protocols.http.setup import layer_for as http_layer_for
from hostagent.protocols.kubernetes.layer import KubernetesLayer


def layer_for(ctx) -> KubernetesLayer:
    lay = http_layer_for(ctx, True, cls=KubernetesLayer)
    return lay

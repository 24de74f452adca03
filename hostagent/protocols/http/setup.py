"""A session's HTTP layer from what the driver knows of it (SessionContext)."""
from __future__ import annotations

from hostagent.masking import for_target
from hostagent.policy import decide
from hostagent.protocols.http.bodies import BodyMasker
from hostagent.protocols.http.layer import HttpLayer


def layer_for(ctx, tls: bool, cls=HttpLayer) -> HttpLayer:
    opts, policy = ctx.options, ctx.policy
    masker = for_target(policy.masks, ctx.target.name)
    paths = tuple((r.name, p) for r in masker.rules for p in getattr(r, "json", ()))
    return cls(
        decide=lambda req: decide(policy, req), target=ctx.target.name,
        identity=ctx.identity, protocol=ctx.target.protocol, tls=tls,
        names=tuple(dict.fromkeys((*ctx.target.names, ctx.dialed))),
        server_name=opts.get("server_name") or "", ca=opts.get("ca"),
        inject=opts.get("secret_headers") or (),
        keep_authorization=opts.keep_authorization,
        masker=BodyMasker(masker, paths),
        # (Kubernetes reads bodies always: an ephemeral container's command is in one)
        judge_json=cls is not HttpLayer or any(
            name == "json" for r in policy.rules for name, _ in r.matchers),
        max_body=opts.max_body,
        sample_bytes=ctx.samples.bytes if ctx.samples else 4096,
        client_cert=opts.get("client_cert"), client_key=opts.get("client_key"))

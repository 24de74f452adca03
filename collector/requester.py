"""Who asked for an approval, and which callers count as that someone.

The requester is a pair: the host agent principal that filed the request (`created_by`,
authenticated by the collector) and the Unix user the held command runs as on that host
(`requested_by`, as the kernel showed it to that host agent). A token names a person and
a Unix user names an account on a host, so the two are never compared by name: a person's
token is linked to the accounts they use with `unix_users` in the collector config.
"""
from __future__ import annotations

from collector.auth import Principal
from collector.storage import ApprovalRow


def may_act_on(principal: Principal, row: ApprovalRow) -> bool:
    """Host agents follow and cancel only their own requests; the other roles are not
    bound (admins may cancel any, readers may watch any)."""
    return principal.role != "hostagent" or principal.name == row.created_by


def is_own_request(decider: Principal, row: ApprovalRow) -> bool:
    # In open mode the one local principal both files (as the host agent) and decides (as
    # the admin): refusing it there would leave nobody able to decide.
    if decider.via != "local" and decider.name == row.created_by:
        return True
    return any(_links(account, row.requested_by, row.host) for account in decider.unix_users)


def _links(account: str, user: str, host: str) -> bool:
    """`account` is "user" (on any host) or "user@host" (config checked the form)."""
    name, at, only_host = account.partition("@")
    # Host names are case-insensitive; matching more widely refuses more, never less.
    return name == user and (not at or only_host.lower() == host.lower())

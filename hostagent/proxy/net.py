"""Network helpers of the proxy: addresses, listening pairs, connecting upstream."""
from __future__ import annotations

import asyncio
import errno
import random
import socket
import struct

CONNECT_TIMEOUT = 10.0


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_hostport(text: str, default_port: int = 0) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    return host, int(port) if port else default_port


def resolve(host: str, port: int) -> list[tuple[str, int]]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({(i[4][0], port) for i in infos})


async def connect_any(addresses: list[tuple[str, int]], limit: int):
    """The first address that answers, in order (a target may list several)."""
    error: Exception | None = None
    for host, port in addresses:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=limit),
                                          CONNECT_TIMEOUT)
            return r, w, (host, port)
        except (OSError, asyncio.TimeoutError) as exc:
            error = exc
    raise error or OSError("no address")


async def connect_leg(addresses: list[tuple[str, int]], protocol: asyncio.Protocol):
    """As connect_any, for a protocol of ours (the proxy's legs): the address used."""
    loop = asyncio.get_running_loop()
    error: Exception | None = None
    for host, port in addresses:
        try:
            await asyncio.wait_for(loop.create_connection(lambda: protocol, host, port),
                                   CONNECT_TIMEOUT)
            return host, port
        except (OSError, asyncio.TimeoutError) as exc:
            error = exc
    raise error or OSError("no address")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: the client sees a refused connection, not a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def unprivileged_port_start() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read())
    except (OSError, ValueError):
        return 1024


def ipv6_loopback(host6: str = "::1") -> bool:
    """Whether IPv6 loopback can be listened on (hosts may run IPv4 only)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((host6, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            return False
        raise


def _bind_both(port: int, host4: str, host6: str) -> list[socket.socket]:
    """Both loopbacks; IPv4's alone on a host without IPv6 loopback, where an enrolled
    IPv6 connect, rewritten to [::1], then fails (closed: it reaches nothing)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM)]
    if ipv6_loopback(host6):
        socks.append(socket.socket(socket.AF_INET6, socket.SOCK_STREAM))
    try:
        for s in socks:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        socks[0].bind((host4, port))
        if len(socks) > 1:
            socks[1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            socks[1].bind((host6, socks[0].getsockname()[1]))
    except OSError:
        for s in socks:
            s.close()
        raise
    for s in socks:
        s.listen(1024)
        s.setblocking(False)
    return socks


def bind_pair(port: int = 0, host4: str = "127.0.0.1", host6: str = "::1", *,
              privileged: bool = True) -> list[socket.socket]:
    """Listening sockets on host4 and host6 with one port number. The proxy's port is a
    privileged one: while the host agent is down nobody else may take it and receive
    what the programs still redirect there. Port 0 picks a free one."""
    limit = unprivileged_port_start()
    if port:
        if privileged and port >= limit:
            raise OSError(f"proxy port {port} is not privileged (< {limit}): any user could "
                          "take it while the host agent is down")
        return _bind_both(port, host4, host6)
    if not privileged:
        for _ in range(20):
            try:
                return _bind_both(0, host4, host6)
            except OSError:
                continue
        raise OSError("no port free on both IPv4 and IPv6 loopback")
    candidates = list(range(max(limit - 512, 1), limit))
    random.shuffle(candidates)
    for candidate in candidates:
        try:
            return _bind_both(candidate, host4, host6)
        except OSError:
            continue
    raise OSError(f"no privileged port (< {limit}) free on both IPv4 and IPv6 loopback")

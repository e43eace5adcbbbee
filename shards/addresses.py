"""Which addresses the download stage may connect to: by default only globally reachable ones.

A URL list from the web can name `http://169.254.169.254/...` (a cloud machine's metadata service, which
hands out credentials), `localhost`, or 10.x / 172.16-31.x / 192.168.x hosts, directly or through a
redirect. So, unless `--allow-private-addresses`, every host name is resolved by `PublicResolver`, which
drops loopback, private, link-local, multicast, reserved and otherwise non-global addresses; aiohttp then
connects to exactly the addresses it returned (it never resolves again), so a DNS answer that changes
between check and connect (rebinding) cannot slip through. Hosts written as IP addresses never reach a
resolver: `guard` checks them on every request, redirects included. `--allow-networks` lets chosen
networks through (an intranet image server) while the rest stay blocked.
"""
from __future__ import annotations

import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from yarl import URL

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses that stand for an IPv4 one
REDIRECTS = (301, 302, 303, 307, 308)
_CHECKS = (("loopback", "is_loopback"), ("link-local", "is_link_local"), ("unspecified", "is_unspecified"),
           ("multicast", "is_multicast"), ("reserved", "is_reserved"), ("private", "is_private"))


def address_problem(address: str, allowed=()) -> str | None:
    """Why a connection to this IP address is refused ("loopback", "private", ...), or None if it is a
    globally reachable address (or inside one of the `allowed` networks)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if any(ip in net for net in allowed):
        return None
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
        if embedded is not None:  # ::ffff:10.0.0.1, 2002:a00::, 64:ff9b::a9fe:a9fe reach that IPv4 address
            return address_problem(str(embedded), allowed)
    for name, attr in _CHECKS:
        if getattr(ip, attr):
            return name
    return None if ip.is_global else "not globally reachable"


def parse_networks(text: str) -> tuple:
    """`10.1.0.0/16, 192.168.7.5` -> ip_network objects (ValueError names the bad one)."""
    nets = []
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError as exc:
            raise ValueError(f"not a network: {part!r} ({exc})") from exc
    return tuple(nets)


class BlockedAddress(OSError):
    """A host that resolves only to refused addresses (an OSError: aiohttp reports it as a DNS failure,
    with this as its `os_error`)."""

    def __init__(self, host: str, address: str, problem: str):
        super().__init__(f"{host} resolves to {address}, {_a(problem)} address (--allow-private-addresses "
                         "to fetch it)" if host != address else
                         f"{address} is {_a(problem)} address (--allow-private-addresses to fetch it)")


class BlockedAddressError(aiohttp.ClientConnectionError):
    """A request to an IP-literal host that is refused (raised by `guard`, before any connection)."""


class ConnectionDropped(aiohttp.ClientConnectionError):
    """The server closed or reset the connection before answering. Raised instead of aiohttp's own error
    type so that aiohttp does not silently send the request again: each try is counted, and limited, by
    the download stage's retries."""


class RedirectRefused(aiohttp.ClientError):
    """A redirect to something other than an http(s) URL (file:, ftp:, data:, ...): a final answer."""

    def __init__(self, status: int, scheme: str):
        super().__init__(f"HTTP {status}: redirect to {_a(scheme)}: URL (only http and https are followed)")
        self.status = status


class PublicResolver(AbstractResolver):
    """aiohttp's resolver, keeping only the addresses `address_problem` accepts."""

    def __init__(self, inner: AbstractResolver | None = None, allowed=()):
        self._inner = inner or DefaultResolver()
        self._allowed = allowed

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        found = await self._inner.resolve(host, port, family)
        keep = [r for r in found if address_problem(r["host"], self._allowed) is None]
        if found and not keep:
            raise BlockedAddress(host, found[0]["host"], address_problem(found[0]["host"], self._allowed))
        return keep

    async def close(self) -> None:
        await self._inner.close()


def guard(allow_private: bool, allowed=()):
    """A client middleware: refuses IP-literal hosts that are not public (each request and each redirect
    hop passes here), and turns a dropped connection into ConnectionDropped (see there)."""
    async def middleware(req: aiohttp.ClientRequest, handler):
        host = (req.url.raw_host or "").strip("[]")
        if not allow_private and _is_ip(host):
            problem = address_problem(host, allowed)
            if problem:
                raise BlockedAddressError(f"{host} is {_a(problem)} address (--allow-private-addresses to fetch it)")
        try:
            resp = await handler(req)
        except aiohttp.ClientConnectorError:
            raise  # never resent by aiohttp: no request reached the server
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            raise ConnectionDropped(_describe(exc)) from exc
        if resp.status in REDIRECTS and (location := resp.headers.get("Location")):
            scheme = _scheme(req.url, location)
            if scheme not in ("http", "https"):
                resp.release()
                raise RedirectRefused(resp.status, scheme)
        return resp
    return middleware


def _scheme(base: URL, location: str) -> str:
    try:
        return base.join(URL(location)).scheme.lower()
    except (ValueError, TypeError):
        return "unreadable"


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__

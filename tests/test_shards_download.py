"""The download stage as a crawler, against threaded HTTP servers on loopback addresses (tests/webserver.py):
each try is exactly one request at the server; each host gets as many connections as it handles well
(more while it answers quickly, half as many after 429/503/timeouts/resets, paused for its Retry-After);
and only public addresses are fetched unless allowed (checked without connecting; end to end on loopback).
"""
from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver

from mocostream.ops.ports import free_port
from mocostream.shards import rejects as rejects_file
from mocostream.shards.addresses import BlockedAddress, address_problem, parse_networks
from mocostream.shards.download import HttpOptions, open_session
from mocostream.shards.hosts import Hosts
from helpers import create_from_loopback
from webserver import WebServer

FAST = dict(timeout=5.0, retries=2, backoff=0.05, max_bytes=1 << 20, allow_private=True)


def make(sources, out, http=None, **kw):
    return create_from_loopback(sources, out, {**FAST, **(http or {})}, **kw)


def rejects(out) -> dict[str, dict]:
    path = Path(out) / "rejects.jsonl"
    return {d["url"]: d for d in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def url_list(tmp_path, base: str, kinds, name="urls.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{base}/{k}/{i}.jpg\n" for i, k in enumerate(kinds)))
    return path


@pytest.fixture(scope="module")
def photos(webphotos) -> list[bytes]:
    return [p.read_bytes() for p in sorted(Path(webphotos).glob("*.jpg"))[:20]]


# ---------------------------------------------------------------- attempts as promised

@pytest.mark.slow
@pytest.mark.parametrize("retries", [0, 2])
def test_the_server_sees_one_request_per_try(photos, tmp_path, retries):
    # Resets come on kept-alive connections (ok URLs before them on the same host): aiohttp would resend
    # such a request by itself, doubling the tries the server sees.
    kinds = ["ok", "reset", "ok", "429always", "ok", "503always", "ok", "reset"] * 4 + ["hang", "ok"]
    with WebServer(photos, hang=30.0, retry_after=0) as srv:
        out = tmp_path / "o"
        r = make([url_list(tmp_path, srv.url, kinds)], out, http={"retries": retries, "timeout": 2.0})
        got = rejects(out)
        for i, kind in enumerate(kinds):
            seen = len(srv.times[f"/{kind}/{i}.jpg"])
            if kind == "ok":
                assert seen == 1
            else:
                assert seen == 1 + retries == got[f"{srv.url}/{kind}/{i}.jpg"]["attempts"], (kind, seen)
    assert r.written == kinds.count("ok") and r.inputs == len(kinds)


# ---------------------------------------------------------------- adaptive per-host connections

def test_a_host_limit_grows_on_quick_clean_answers_and_halves_once_per_round_trip():
    async def run():
        hosts = Hosts(start=4, cap=10)
        g = hosts.gate("h")
        granted = [await hosts.acquire(g) for _ in range(4)]
        waiting = [asyncio.ensure_future(hosts.acquire(g)) for _ in range(20)]
        await asyncio.sleep(0)
        assert g.active == 4 and not any(w.done() for w in waiting)
        for t in granted:  # slow start: half a connection more per quick clean answer while requests wait
            hosts.release(g, t, "ok", 0.05)
        await asyncio.sleep(0)
        assert g.limit == 6 and g.active == 6 and sum(w.done() for w in waiting) == 6
        hosts.release(g, granted[0], "ok", 5.0)  # slow (over 2x the best): no growth
        assert g.limit == 6
        sent_before_cut = granted[0]
        hosts.release(g, sent_before_cut, "429")  # 6 in use: halved to 3
        assert g.limit == 3 and hosts.backoffs["429"] == 1 and g.ceiling == 6
        hosts.release(g, sent_before_cut, "timeout")  # sent before the cut: no second cut
        assert g.limit == 3 and hosts.backoffs["timeout"] == 0
        hosts.release(g, asyncio.get_running_loop().time(), "connection")  # sent after the cut: cuts again
        assert g.limit == 1.5 and hosts.backoffs["connection"] == 1 and g.ceiling == 6  # only a 429 sets it
        for _ in range(3):
            hosts.release(g, asyncio.get_running_loop().time(), "503")
        assert g.limit == 1  # never below one connection
        for w in waiting:
            w.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    asyncio.run(run())


def test_a_host_that_refuses_above_n_connections_sees_few_refusals():
    """A simulated host answering 429 to any request beyond 6 at once, asked by 64 clients in parallel:
    the limit settles near 6 and under 2% of the requests are refused."""
    async def run():
        hosts = Hosts(start=4, cap=64)
        g = hosts.gate("h")
        counts = {"requests": 0, "refused": 0}
        queue = list(range(3000))

        async def client():
            while queue:
                queue.pop()
                t = await hosts.acquire(g)
                counts["requests"] += 1
                if g.active > 6:
                    counts["refused"] += 1
                    hosts.release(g, t, "429", 0.001)
                else:
                    await asyncio.sleep(0.002)
                    hosts.release(g, t, "ok", 0.002)
        await asyncio.gather(*(client() for _ in range(64)))
        return counts, g.limit
    counts, limit = asyncio.run(run())
    assert counts["refused"] / counts["requests"] < 0.02, counts
    assert 3 <= limit <= 8


def test_a_healthy_host_gets_more_connections_up_to_the_cap(photos, tmp_path):
    with WebServer(photos, latency=0.05) as srv:
        r = make([url_list(tmp_path, srv.url, ["ok"] * 150)], tmp_path / "o",
                 http={"concurrency": 32, "per_host": 12})
        assert r.written == 150 and 4 < srv.peak <= 12  # started at 4, grew, never past the cap


@pytest.mark.slow
def test_a_host_limiting_connections_gets_few_429s_end_to_end(photos, tmp_path):
    with WebServer(photos, latency=0.05) as srv:
        srv.max_active = 5
        r = make([url_list(tmp_path, srv.url, ["ok"] * 300)], tmp_path / "o", http={"concurrency": 64})
        assert r.written == 300
        assert srv.refused / srv.requests < 0.05, (srv.refused, srv.requests)


def test_retry_after_pauses_the_whole_host(photos, tmp_path):
    # One connection: the 503's Retry-After (1 s) must hold back the next URL too, not only its own retry.
    with WebServer(photos, retry_after=1) as srv:
        r = make([url_list(tmp_path, srv.url, ["503", "ok", "ok"])], tmp_path / "o", http={"per_host": 1})
        assert r.written == 3
        assert srv.times["/ok/1.jpg"][0] - srv.times["/503/0.jpg"][0] >= 1.0


@pytest.mark.slow
def test_a_paused_host_does_not_hold_up_the_others(photos, tmp_path):
    # Host A asks for a 10 s pause at once; with 4 requests allowed in flight, A's waiting URLs must not
    # take the places of host B's, which are all served while A waits.
    with WebServer(photos, retry_after=10, hosts=2) as srv:
        a, b = srv.urls
        src = tmp_path / "urls.txt"
        src.write_text(f"{a}/503/0.jpg\n" + "".join(f"{a}/ok/{i}.jpg\n{b}/ok/{100 + i}.jpg\n" for i in range(1, 31)))
        r = make([src], tmp_path / "o", http={"concurrency": 4})
        paused_at = srv.times["/503/0.jpg"][0]
        b_times = [t for i in range(101, 131) for t in srv.times[f"/ok/{i}.jpg"]]
        assert r.written == 61 and len(b_times) == 30 and max(b_times) < paused_at + 10


def test_host_metrics_and_back_offs_are_served(photos, tmp_path):
    port = free_port()
    with WebServer(photos, retry_after=0, hosts=2) as srv:
        src = tmp_path / "urls.txt"
        src.write_text("".join(f"{srv.urls[i % 2]}/{'503' if i == 3 else 'ok'}/{i}.jpg\n" for i in range(12)))
        make([src], tmp_path / "o", metrics_port=port)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    host = srv.urls[1].removeprefix("http://")
    assert f'mocostream_ingest_host_connection_limit{{host="{host}",rank="0"}}' in text
    assert 'mocostream_ingest_host_connections{host="other",rank="0"} 0.0' in text
    assert 'mocostream_ingest_host_backoffs_total{cause="503",rank="0"} 1.0' in text
    assert 'mocostream_ingest_host_backoffs_total{cause="429",rank="0"} 0.0' in text
    import subprocess
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_the_progress_line_shows_connections_and_back_offs(photos, tmp_path):
    from helpers import shards_cli as cli

    # 20 answers of 0.2 s, 2 at a time: at least 2 s, so the line (refreshed every second) shows the host
    with WebServer(photos, latency=0.2) as srv:
        p = cli("create", url_list(tmp_path, srv.url, ["ok"] * 20), "--out", tmp_path / "o", "--workers", "1",
                "--allow-private-addresses", "--dedup", "none", "--per-host-connections", "2")
    host = srv.url.removeprefix("http://")
    assert f"conns to 1 hosts (most: {host} " in p.stderr and " back-offs" in p.stderr, p.stderr[-500:]


# ---------------------------------------------------------------- public addresses only

@pytest.mark.parametrize("address, problem", [
    ("169.254.169.254", "link-local"), ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("100.64.0.1", "not globally reachable"), ("0.0.0.0", "unspecified"), ("224.0.0.251", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.10", "private"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fe80::1%2", "link-local"),
    ("fc00::1", "private"), ("fd12:3456::1", "private"), ("ff02::1", "multicast"), ("2001:db8::1", "private"),
    ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("2002:c0a8:101::1", "private"), ("::a9fe:a9fe", "reserved"),
    ("8.8.8.8", None), ("172.32.0.1", None), ("2606:4700::1111", None), ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None), ("not-an-address", "not an IP address")])
def test_the_address_classifier(address, problem):
    assert address_problem(address) == problem


def test_allowed_networks_let_only_themselves_through():
    nets = parse_networks("10.20.0.0/16, 192.168.7.5")
    assert address_problem("10.20.3.4", nets) is None and address_problem("192.168.7.5", nets) is None
    assert address_problem("10.21.0.1", nets) == "private" and address_problem("169.254.169.254", nets) == "link-local"
    with pytest.raises(ValueError, match="10.0.0.0/99"):
        parse_networks("10.0.0.0/99")


def test_private_addresses_are_refused_by_default(photos, tmp_path):
    with WebServer(photos) as srv:
        port = srv.httpd.server_address[1]
        urls = [f"http://127.0.0.1:{port}/ok/0.jpg", f"http://localhost:{port}/ok/1.jpg",
                f"http://[::1]:{port}/ok/2.jpg", f"http://127.0.0.1:{port}/redirect/3.jpg"]
        (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
        r = make([tmp_path / "urls.txt"], tmp_path / "o", http={"allow_private": False})
        assert srv.requests == 0  # refused before connecting
    got = rejects(tmp_path / "o")
    assert r.written == 0 and {u: got[u]["reason"] for u in urls} == dict.fromkeys(urls, "blocked_address")
    assert all(got[u]["attempts"] == 1 and not rejects_file.can_retry(rejects_file.parse(
        json.dumps(got[u]).encode())[0]) for u in urls)  # final: --retry-failed leaves them
    assert "loopback" in got[urls[0]]["detail"] and "localhost resolves to" in got[urls[1]]["detail"]


@pytest.mark.parametrize("allowed, start, target", [
    (0, 0, "http://{ip1}:{port1}/ok/{{n}}.jpg"),       # to a refused IP address
    (1, 1, "http://localhost:{port0}/ok/{{n}}.jpg")])  # to a name that resolves to refused addresses
def test_a_redirect_into_a_private_network_is_refused(photos, tmp_path, allowed, start, target):
    with WebServer(photos, hosts=2) as srv:
        (ip0, port0), (ip1, port1) = (s.server_address for s in srv.servers)
        srv.redirect_to = target.format(ip1=ip1, port1=port1, port0=port0)
        base = srv.urls[start]
        r = make([url_list(tmp_path, base, ["redirect", "ok"])], tmp_path / "o",
                 http={"allow_private": False, "allow_networks": f"{srv.servers[allowed].server_address[0]}/32"})
        assert srv.per_host == {srv.servers[start].server_address[0]: 2}  # the redirect's target saw nothing
    got = rejects(tmp_path / "o")
    assert r.written == 1 and got[f"{base}/redirect/0.jpg"]["reason"] == "blocked_address"


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/{n}.jpg", "file:///etc/hostname", "data:image/jpeg;base64,AA"])
def test_a_redirect_to_a_non_http_url_is_a_final_http_error(photos, tmp_path, target):
    with WebServer(photos) as srv:
        srv.redirect_to = target
        make([url_list(tmp_path, srv.url, ["redirect"])], tmp_path / "o")
        assert srv.requests == 1
    got = rejects(tmp_path / "o")[f"{srv.url}/redirect/0.jpg"]
    assert (got["reason"], got["status"], got["attempts"]) == ("http_error", 302, 1)
    assert target.split(":")[0] + ":" in got["detail"]


def test_redirects_are_bounded(photos, tmp_path):
    with WebServer(photos) as srv:
        make([url_list(tmp_path, srv.url, ["loop", "redirect", "ok"])], tmp_path / "a", http={"max_redirects": 2})
        assert len(srv.times["/loop/0.jpg"]) == 3 and len(srv.times["/ok/1.jpg"]) == 1  # followed: 2
        srv.reset_counts()
        r = make([url_list(tmp_path, srv.url, ["redirect", "ok"], "b.txt")], tmp_path / "b", http={"max_redirects": 0})
        assert srv.requests == 2 and r.written == 1
    a, b = rejects(tmp_path / "a"), rejects(tmp_path / "b")
    assert (a[f"{srv.url}/loop/0.jpg"]["reason"], a[f"{srv.url}/loop/0.jpg"]["detail"]) == ("http_error",
                                                                                          "more than 2 redirects")
    assert f"{srv.url}/redirect/1.jpg" not in a
    assert b[f"{srv.url}/redirect/0.jpg"]["status"] == 302 and "not followed" in b[f"{srv.url}/redirect/0.jpg"]["detail"]


class _Rebinding(AbstractResolver):
    """A name server that gives one address first and another one after (DNS rebinding)."""

    def __init__(self, first: tuple[str, int], later: tuple[str, int]):
        self.answers, self.calls = (first, later), 0

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.calls += 1
        ip, p = self.answers[min(self.calls, 2) - 1]
        return [{"hostname": host, "host": ip, "port": p, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV}]

    async def close(self):
        pass


def test_the_address_checked_is_the_address_connected_to(photos):
    """The name is resolved once, and the connection goes to the address that passed the check: a name
    server that answers an allowed address, then a refused one, cannot steer a request to the second."""
    with WebServer(photos, hosts=2) as srv:
        (ip0, port0), (ip1, port1) = (s.server_address for s in srv.servers)
        opts = HttpOptions(allow_networks=f"{ip1}/32", timeout=5.0)

        async def run(first, later):
            dns = _Rebinding(first, later)
            statuses = []
            async with open_session(opts, dns) as session:
                for i in range(3):
                    try:
                        async with session.get(f"http://images.example:{port1}/ok/{i}.jpg") as resp:
                            statuses.append(resp.status)
                    except aiohttp.ClientConnectorError as exc:
                        statuses.append(type(exc.os_error).__name__)
            return statuses

        assert asyncio.run(run((ip1, port1), (ip0, port0))) == [200, 200, 200]
        assert srv.per_host == {ip1: 3}
        srv.reset_counts()
        assert asyncio.run(run((ip0, port0), (ip0, port0))) == [BlockedAddress.__name__] * 3
        assert srv.requests == 0

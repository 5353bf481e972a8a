"""The DNS front end's I/O: a :class:`~resolver.dns.answerer.DnsAnswerer` over UDP and TCP.

:class:`DnsServer` (or :func:`start_dns`) runs the answerer over asyncio: a UDP
endpoint that drains a burst of datagrams per wake-up, with response rate limiting per
client prefix (:mod:`resolver.dns.rrl`), and a TCP server (2-byte length framing,
several queries per connection, an idle timeout, a cap on connections per client
address and in total), both on the same port.  What is answered is the answerer's
business (``docs/dns.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

from resolver.dns.answerer import (
    CACHE_SIZE,
    DEFAULT_ZONE,
    DISCOVERY_LIMIT,
    EDNS_PAYLOAD,
    MAX_TTL,
    MAX_UDP_RATIO,
    NEGATIVE_TTL,
    DnsAnswerer,
    ResolverView,
    truncated,
)
from resolver.dns.rrl import DROP, RRL_RESPONSES_PER_S, RRL_SLIP, RateLimiter

__all__ = [
    "DEFAULT_PORT",
    "MAX_TCP_CLIENTS",
    "MAX_TCP_PER_CLIENT",
    "TCP_IDLE_S",
    "DnsServer",
    "start_dns",
]

_log = logging.getLogger("resolver.dns")

DEFAULT_PORT: Final = 8753
TCP_IDLE_S: Final = 10.0
MAX_TCP_CLIENTS: Final = 256
"""Open TCP connections at a time, from all clients."""
MAX_TCP_PER_CLIENT: Final = 16
"""Open TCP connections at a time from one client address."""


class _UdpEndpoint:
    """A UDP socket on the event loop that drains up to ``burst`` datagrams per wake-up.

    asyncio's datagram transport hands over one datagram per loop iteration, so at high
    rates most of the time goes into the loop itself; reading a burst per readiness
    event and sending each answer straight from the socket triples the rate (see
    ``bench/dns.py``).  An answer that cannot be sent at once (socket buffer full) is
    dropped, as a kernel or router would drop it; the client asks again.
    """

    def __init__(
        self,
        sock: socket.socket,
        answer: Callable[[bytes, bool], bytes | None],
        burst: int = 64,
        rrl: RateLimiter | None = None,
    ) -> None:
        self.sock = sock
        self._answer = answer
        self._burst = burst
        self.rrl = rrl
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._ready if rrl is None else self._ready_rrl)

    @classmethod
    async def bind(
        cls,
        host: str,
        port: int,
        answer: Callable[[bytes, bool], bytes | None],
        rrl: RateLimiter | None = None,
    ) -> _UdpEndpoint:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        family, _, proto, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        try:
            sock.setblocking(False)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        return cls(sock, answer, rrl=rrl)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _ready(self) -> None:
        recvfrom, sendto, answer = self.sock.recvfrom, self.sock.sendto, self._answer
        for _ in range(self._burst):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error for an earlier answer
                continue
            try:
                out = answer(data, False)
                if out is not None:
                    sendto(out, addr)
            except (BlockingIOError, InterruptedError, ConnectionError):
                pass  # dropped, like any UDP datagram can be
            except Exception:  # never let one datagram stop the endpoint
                _log.exception("DNS/UDP: failed to answer a query from %s", addr)

    def _ready_rrl(self) -> None:
        """:meth:`_ready` with response rate limiting (the clock is read once per wake-up)."""
        recvfrom, sendto, answer = self.sock.recvfrom, self.sock.sendto, self._answer
        check = self.rrl.check  # type: ignore[union-attr]
        now = time.monotonic()
        for _ in range(self._burst):
            try:
                data, addr = recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            try:
                verdict = check(addr[0], now)
                if not verdict:  # SEND
                    out = answer(data, False)
                elif verdict == DROP:
                    continue
                else:
                    out = truncated(data)
                if out is not None:
                    sendto(out, addr)
            except (BlockingIOError, InterruptedError, ConnectionError):
                pass
            except Exception:
                _log.exception("DNS/UDP: failed to answer a query from %s", addr)

    def close(self) -> None:
        self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


class DnsServer:
    """The DNS front end over UDP and TCP on one port; start with :meth:`start`.

    ``port=0`` picks a free port (the same for UDP and TCP); read it from :attr:`port`
    after start.  Other keyword arguments go to :class:`DnsAnswerer`.
    """

    def __init__(
        self,
        resolver: ResolverView,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        zone: str = DEFAULT_ZONE,
        tcp_idle_s: float = TCP_IDLE_S,
        max_tcp_clients: int = MAX_TCP_CLIENTS,
        max_tcp_per_client: int = MAX_TCP_PER_CLIENT,
        rrl_responses_per_s: int = RRL_RESPONSES_PER_S,
        rrl_slip: int = RRL_SLIP,
        max_ttl: int = MAX_TTL,
        negative_ttl: int = NEGATIVE_TTL,
        discovery_limit: int = DISCOVERY_LIMIT,
        max_udp: int = EDNS_PAYLOAD,
        max_udp_ratio: int = MAX_UDP_RATIO,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        if tcp_idle_s <= 0 or max_tcp_clients < 1 or max_tcp_per_client < 1:
            raise ValueError("tcp_idle_s > 0, max_tcp_clients >= 1, max_tcp_per_client >= 1")
        if rrl_responses_per_s < 0 or rrl_slip < 0:
            raise ValueError("rrl_responses_per_s >= 0 (0: off), rrl_slip >= 0")
        self._resolver = resolver
        self.host = host
        self.port = port
        self.zone = zone
        self.tcp_idle_s = tcp_idle_s
        self.max_tcp_clients = max_tcp_clients
        self.max_tcp_per_client = max_tcp_per_client
        self.rrl_responses_per_s = rrl_responses_per_s
        self.rrl_slip = rrl_slip
        self._new_answerer = functools.partial(
            DnsAnswerer,
            max_ttl=max_ttl,
            negative_ttl=negative_ttl,
            discovery_limit=discovery_limit,
            max_udp=max_udp,
            max_udp_ratio=max_udp_ratio,
            cache_size=cache_size,
        )
        self._answerer: DnsAnswerer | None = None
        self._rrl: RateLimiter | None = None
        self._udp: _UdpEndpoint | None = None
        self._tcp: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._per_client: dict[str, int] = {}
        self.tcp_refused = 0
        """TCP connections closed at once: over the per-client or the total cap."""
        self.tcp_idle_closed = 0
        """TCP connections closed after ``tcp_idle_s`` without a query (or a stuck write)."""

    @property
    def answerer(self) -> DnsAnswerer:
        if self._answerer is None:
            raise RuntimeError("the DNS server is not running")
        return self._answerer

    async def start(self) -> None:
        """Bind UDP and TCP and start answering (SERVFAIL until the resolver is ready)."""
        if self._answerer is not None:
            return
        answerer = self._new_answerer(self._resolver, zone=self.zone)
        rrl = None
        if self.rrl_responses_per_s:
            rrl = RateLimiter(self.rrl_responses_per_s, self.rrl_slip)
        attempts = 5 if self.port == 0 else 1
        for attempt in range(attempts):
            udp = await _UdpEndpoint.bind(self.host, self.port, answerer.answer, rrl)
            port = udp.port
            try:
                tcp = await asyncio.start_server(self._client, self.host, port, backlog=1024)
            except OSError:
                udp.close()
                if attempt == attempts - 1:
                    answerer.close()
                    raise
                continue
            break
        self._answerer, self._udp, self._tcp, self.port = answerer, udp, tcp, port
        self._rrl = rrl
        metrics = getattr(self._resolver, "metrics", None)
        if metrics is not None and hasattr(metrics, "dns_stats"):
            metrics.dns_stats = self.stats
            metrics.dns_answers = self.answer_stats
        _log.info(
            "DNS for zone %s on %s port %d (UDP, TCP); rate limit %s",
            answerer.zone,
            self.host,
            port,
            f"{self.rrl_responses_per_s}/s per prefix, slip {self.rrl_slip}" if rrl else "off",
        )

    def stats(self) -> dict[str, int]:
        """The answerer's counters, the rate limiter's, and the TCP ones."""
        out = dict(self._answerer.stats()) if self._answerer is not None else {}
        rrl = self._rrl
        out.update(
            rrl.stats()
            if rrl is not None
            else {"rrl_limited": 0, "rrl_slipped": 0, "rrl_dropped": 0, "rrl_prefixes": 0}
        )
        out["tcp_open"] = len(self._clients)
        out["tcp_refused"] = self.tcp_refused
        out["tcp_idle_closed"] = self.tcp_idle_closed
        return out

    def answer_stats(self) -> tuple[dict[tuple[str, str], int], list[int], int]:
        """Answers by (query type, rcode), answers per size bucket
        (:data:`~resolver.dns.answerer.ANSWER_SIZE_BUCKETS`, then larger), total bytes."""
        a = self._answerer
        if a is None:
            return {}, [], 0
        return dict(a.answers), list(a.sizes), a.size_sum

    async def close(self) -> None:
        """Stop listening, end open TCP connections, drop the cache."""
        if self._tcp is not None:
            self._tcp.close()
        clients = [*self._clients]
        for task in clients:
            task.cancel()
        for task in clients:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._tcp is not None:
            await self._tcp.wait_closed()
            self._tcp = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._answerer is not None:
            self._answerer.close()
            self._answerer = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TCP connection: length-prefixed queries answered in order until idle.

        A connection over the per-address or the total cap is closed at once; one that
        sends no query (or does not read its answers) for ``tcp_idle_s`` is closed.
        """
        task = asyncio.current_task()
        peer = writer.get_extra_info("peername")
        addr = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        per_client = self._per_client
        open_here = per_client.get(addr, 0)
        if (
            task is None
            or self._answerer is None
            or len(self._clients) >= self.max_tcp_clients
            or open_here >= self.max_tcp_per_client
        ):
            self.tcp_refused += 1
            writer.transport.abort()
            return
        self._clients.add(task)
        per_client[addr] = open_here + 1
        answer = self._answerer.answer
        idle = self.tcp_idle_s
        try:
            while True:
                async with asyncio.timeout(idle):
                    head = await reader.readexactly(2)
                    size = int.from_bytes(head, "big")
                    if size == 0:
                        break
                    wire = await reader.readexactly(size)
                out = answer(wire, True)
                if out is None:
                    break
                writer.write(len(out).to_bytes(2, "big") + out)
                async with asyncio.timeout(idle):
                    await writer.drain()
        except TimeoutError:
            self.tcp_idle_closed += 1
            writer.transport.abort()  # do not wait to flush to a client that does not read
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._clients.discard(task)
            left = per_client.get(addr, 1) - 1
            if left > 0:
                per_client[addr] = left
            else:
                per_client.pop(addr, None)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()


async def start_dns(
    resolver: ResolverView,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    zone: str = DEFAULT_ZONE,
    **options: Any,
) -> DnsServer:
    """Start a :class:`DnsServer` for ``resolver``; stop it with ``await server.close()``.

    ``options`` are the other keyword arguments of :class:`DnsServer`.
    """
    server = DnsServer(resolver, host=host, port=port, zone=zone, **options)
    await server.start()
    return server

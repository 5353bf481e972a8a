"""The DNS answerer: verified entries and discovery as DNS names, with no I/O.

Two layers, as in dnspython's own resolver:

* :class:`DnsAnswerer` (this module) does no I/O: query wire bytes in, response wire
  bytes out.  It reads the :class:`~resolver.core.Resolver` (which only ever holds
  verified entries) and keeps a cache of rendered answers as wire bytes.
* :class:`~resolver.dns.server.DnsServer` (or :func:`~resolver.dns.server.start_dns`)
  runs it over asyncio: a UDP datagram endpoint and a TCP server (2-byte length
  framing, several queries per connection, idle timeout), both on the same port.

The names, records, TTL rules and caching are described in ``docs/dns.md``; in short,
under the zone (default ``cpi.``)::

    4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi.                     TXT cpid=... kid=... v=3 live=1
                                                           A/AAAA (endpoint IP literals)
    _inference._https.4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi.   SRV 0 0 443 <host>
    ep0.4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi.                 A/AAAA of endpoint 0
    _gpu._cpi.31.cn.cpi.                                   PTR <CPID names>, ranked, capped
    _h100._gpu._cpi.31.cn.cpi.                             PTR ... with that accelerator

**Cache.**  A response is stored as its wire bytes minus the 2-byte ID, keyed by the
query's bytes after the ID (which hold the flags, the question and the OPT record with
its payload size), one table per transport.  A repeated query costs a dictionary lookup
and a concatenation that puts the new ID in front.  Each stored answer carries tags
(the CPID it shows, the namespaces whose discovery it reflects); a resolver listener
drops the tagged answers when an entry changes, and the whole cache is dropped if the
resolver's generation moves without an event.  Answers whose TTL is bound by liveness
also expire by the clock, so a TTL never outlives the liveness it was computed from.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import logging
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdata import Rdata
from dns.rdtypes.ANY.HINFO import HINFO
from dns.rdtypes.ANY.NS import NS
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.SRV import SRV

from resolver.discovery import Query
from resolver.entry import Entry
from resolver.errors import NotReadyError
from resolver.events import Event
from schemas.cpid import CPID, KINDS, parse_namespace
from schemas.cpid import parse as parse_cpid
from schemas.errors import InvalidCPIDError

if TYPE_CHECKING:
    from resolver.core import DiscoveryResult

__all__ = [
    "CACHE_SIZE",
    "DEFAULT_ZONE",
    "DISCOVERY_LIMIT",
    "EDNS_PAYLOAD",
    "MAX_TTL",
    "MAX_UDP_RATIO",
    "NEGATIVE_TTL",
    "DnsAnswerer",
    "ResolverView",
    "truncated",
]

_log = logging.getLogger("resolver.dns")

DEFAULT_ZONE: Final = "cpi."
MAX_TTL: Final = 30
"""Cap on every positive TTL, in seconds (entries change; clients should come back)."""
NEGATIVE_TTL: Final = 5
"""SOA minimum and TTL: how long NXDOMAIN/NODATA may be cached (RFC 2308)."""
DISCOVERY_LIMIT: Final = 20
"""PTR records in a discovery answer, best first."""
EDNS_PAYLOAD: Final = 1232
"""Largest UDP response sent (and the payload size advertised), DNS Flag Day 2020."""
MAX_UDP_RATIO: Final = 10
"""A UDP response is at most this many times the size of its query (0: no such bound);
a larger answer is sent empty with TC set, so the client asks again over TCP."""
CACHE_SIZE: Final = 50_000
"""Rendered answers kept per transport; the oldest eighth goes when full."""
SLACK_S: Final = 1.0
"""Margin taken off liveness-bound TTLs, and how long answers with unknown liveness are kept."""

_IN: Final = dns.rdataclass.IN
_INF: Final = float("inf")
_SERVICE_LABEL: Final = "_cpi"
_PURPOSE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,60}[a-z0-9])?")
_EP = re.compile(r"ep(0|[1-9][0-9]{0,2})")
_KIND_SET: Final = frozenset(KINDS)
_AXFR_TYPES: Final = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})

Rcode = dns.rcode.Rcode

# dnspython's rdata constructors are not annotated; these typed names keep mypy checking
_new_a: Callable[..., Rdata] = A
_new_hinfo: Callable[..., Rdata] = HINFO
_new_aaaa: Callable[..., Rdata] = AAAA
_new_ns: Callable[..., Rdata] = NS
_new_ptr: Callable[..., Rdata] = PTR
_new_soa: Callable[..., Rdata] = SOA
_new_srv: Callable[..., Rdata] = SRV
_new_txt: Callable[..., Rdata] = TXT


class ResolverView(Protocol):
    """What the answerer reads of a :class:`~resolver.core.Resolver` (which it usually is)."""

    @property
    def revision(self) -> int: ...

    @property
    def generation(self) -> int: ...

    def get(self, cpid: str | CPID) -> Entry | None: ...

    def discover(self, query: Query) -> DiscoveryResult: ...

    def add_listener(self, callback: Callable[[Event], None]) -> Callable[[], None]: ...


@dataclass(slots=True)
class _Cached:
    body: bytes  # the response without its 2-byte ID
    expires: float  # time.monotonic() after which it must be rendered again
    tags: tuple[str, ...]
    kind: tuple[str, str]  # (query type, rcode): the key of DnsAnswerer.answers
    bucket: int  # the answer size's bucket in DnsAnswerer.sizes


ANSWER_SIZE_BUCKETS: Final = (64, 128, 256, 512, 1024, 1232, 1500, 4096, 16384, 65535)
"""Upper bounds (bytes) of the answer-size histogram (1232: the EDNS default of DNS Flag Day 2020)."""
_QTYPES: Final = frozenset(
    {
        "A",
        "AAAA",
        "TXT",
        "SRV",
        "NS",
        "SOA",
        "PTR",
        "CNAME",
        "MX",
        "ANY",
        "HTTPS",
        "SVCB",
        "CAA",
        "DS",
        "DNSKEY",
        "AXFR",
        "IXFR",
        "NULL",
    }
)


def _qtype_label(rdtype: dns.rdatatype.RdataType) -> str:
    """The query type's name when it is a common one, else ``other`` (bounded labels)."""
    name = dns.rdatatype.to_text(rdtype)
    return name if name in _QTYPES else "other"


@dataclass(slots=True)
class _Node:
    """What a name holds: RRsets by type (empty for an empty non-terminal)."""

    rrsets: dict[int, dns.rrset.RRset] = field(default_factory=dict)
    additional: list[dns.rrset.RRset] = field(default_factory=list)


@dataclass(slots=True)
class _Lookup:
    """The outcome of looking a name up: a node (None: NXDOMAIN), tags, cache deadline."""

    node: _Node | None
    tags: tuple[str, ...] = ()
    valid_until: float = _INF  # wall clock; the answer must be rendered again after it


@dataclass(slots=True)
class _Ttl:
    """A TTL and the wall-clock time until which an answer carrying it may be reused."""

    ttl: int
    valid_until: float


def _tag_cpid(cpid: str) -> str:
    return "c:" + cpid


def _tag_ns(ns: str) -> str:
    return "n:" + ns


def _ns_tags(prefix: str) -> list[str]:
    """Tags of the zone and of every namespace from the root down to ``prefix``."""
    segs = prefix.split(".")
    return [_tag_ns("")] + [_tag_ns(".".join(segs[:i])) for i in range(1, len(segs) + 1)]


def _header_only(wire: bytes, rcode: Rcode) -> bytes | None:
    """A bare response header for a query that cannot be parsed (None: do not answer)."""
    if len(wire) < 12:
        return None
    (flags,) = struct.unpack_from("!H", wire, 2)
    if flags & dns.flags.QR:
        return None
    out = dns.flags.QR | (flags & (0x7800 | dns.flags.RD)) | rcode
    return wire[:2] + struct.pack("!HHHHH", out, 0, 0, 0, 0)


def truncated(wire: bytes) -> bytes | None:
    """An empty answer with TC set for the query ``wire``: its header and question only.

    What a rate-limited client gets when its response is slipped (``resolver.dns.rrl``):
    never larger than the query, built without parsing more than the question.  None
    when ``wire`` is not a query with one plain question (then nothing is sent).
    """
    if len(wire) < 17:
        return None
    flags, qdcount = struct.unpack_from("!HH", wire, 2)
    if flags & dns.flags.QR or qdcount != 1:
        return None
    i, end = 12, len(wire)
    while True:
        if i >= end:
            return None
        n = wire[i]
        if n == 0:
            break
        if n > 63:  # a compression pointer or a reserved label type
            return None
        i += n + 1
    i += 5  # the root label, type, class
    if i > end:
        return None
    out = dns.flags.QR | dns.flags.TC | (flags & (0x7800 | dns.flags.RD))
    return wire[:2] + struct.pack("!HHHHH", out, 1, 0, 0, 0) + wire[12:i]


class DnsAnswerer:
    """Answers DNS queries about the resolver's verified entries; no I/O.

    Args:
        resolver: the resolver whose entries are served (lookups never wait on etcd).
        zone: the zone answered for (``cpi.``); names outside it are REFUSED.
        max_ttl: cap on positive TTLs (seconds).
        negative_ttl: SOA minimum, the TTL of NXDOMAIN/NODATA answers.
        discovery_limit: PTR records per discovery answer.
        max_udp: largest UDP response sent, whatever a client's EDNS payload size.
        max_udp_ratio: largest UDP response as a multiple of its query's size (0: none).
        cache_size: rendered answers kept per transport.

    :meth:`answer` is the whole interface; :meth:`close` removes the resolver listener.
    """

    def __init__(
        self,
        resolver: ResolverView,
        *,
        zone: str = DEFAULT_ZONE,
        max_ttl: int = MAX_TTL,
        negative_ttl: int = NEGATIVE_TTL,
        discovery_limit: int = DISCOVERY_LIMIT,
        max_udp: int = EDNS_PAYLOAD,
        max_udp_ratio: int = MAX_UDP_RATIO,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_ttl < 0 or negative_ttl < 0:
            raise ValueError("TTLs must not be negative")
        if discovery_limit < 1 or cache_size < 16 or not 512 <= max_udp <= 65535:
            raise ValueError("discovery_limit >= 1, cache_size >= 16, 512 <= max_udp <= 65535")
        if max_udp_ratio != 0 and max_udp_ratio < 2:
            raise ValueError("max_udp_ratio is 0 (no bound) or at least 2")
        self._resolver = resolver
        self._clock = clock
        self._monotonic = monotonic
        self.zone = dns.name.from_text(zone)
        self._zone_text = self.zone.to_text()
        self._zone_dns = "" if self.zone == dns.name.root else self._zone_text
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self.discovery_limit = discovery_limit
        self.max_udp = max_udp
        self.max_udp_ratio = max_udp_ratio
        self.cache_size = cache_size
        self._caches: tuple[dict[bytes, _Cached], dict[bytes, _Cached]] = ({}, {})
        self._tagged: dict[str, set[tuple[int, bytes]]] = {}
        self._generation = resolver.generation
        self._ns_name = dns.name.Name((b"ns", *self.zone.labels))
        self._hostmaster = dns.name.Name((b"hostmaster", *self.zone.labels))
        self.queries = 0
        self.hits = 0
        self.rcodes: dict[str, int] = {}
        self.answers: dict[tuple[str, str], int] = {}
        """Answers (cache hits included) by (query type, rcode)."""
        self.sizes = [0] * (len(ANSWER_SIZE_BUCKETS) + 1)
        """Answers per size bucket (:data:`ANSWER_SIZE_BUCKETS`, then larger)."""
        self.size_sum = 0
        self._remove_listener: Callable[[], None] | None = resolver.add_listener(self._on_event)

    def close(self) -> None:
        """Stop listening to the resolver and drop the cache."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        self._flush()

    # -- the cache --------------------------------------------------------------------

    def answer(self, wire: bytes, tcp: bool = False) -> bytes | None:
        """The response to the query ``wire`` (None: not a query, send nothing).

        ``tcp`` selects the size limit (65535) instead of the UDP limit (the client's
        EDNS payload size, 512 without EDNS, at most ``max_udp`` and at most
        ``max_udp_ratio`` times the query's size); an answer that does not fit over UDP
        is sent empty with the TC bit set.
        """
        if self._resolver.generation != self._generation:
            self._flush()
        key = wire[2:]
        hit = self._caches[tcp].get(key)
        if hit is not None:
            expires = hit.expires
            if expires == _INF or expires > self._monotonic():
                self.hits += 1
                self.answers[hit.kind] += 1
                self.sizes[hit.bucket] += 1
                self.size_sum += len(hit.body) + 2
                return wire[:2] + hit.body
        return self._render(wire, key, tcp)

    def stats(self) -> dict[str, int]:
        """Counters: queries answered from the cache and rendered, by rcode; cache size."""
        return {
            "queries": self.queries + self.hits,
            "cache_hits": self.hits,
            "cached": len(self._caches[0]) + len(self._caches[1]),
            **{f"rcode_{k.lower()}": v for k, v in sorted(self.rcodes.items())},
        }

    def _flush(self) -> None:
        for cache in self._caches:
            cache.clear()
        self._tagged.clear()
        self._generation = self._resolver.generation

    def _on_event(self, event: Event) -> None:
        """Resolver listener: drop the answers that showed or counted the changed entry."""
        if event.type == "put":
            self._generation += 1  # the replica makes one new generation per put
        if not event.cpid:
            return
        self._drop(_tag_cpid(event.cpid))
        for tag in _ns_tags(event.cpid.partition("/")[0]):
            self._drop(tag)

    def _drop(self, tag: str) -> None:
        keys = self._tagged.pop(tag, None)
        if keys:
            for t, key in keys:
                self._evict(t, key, skip=tag)

    def _evict(self, t: int, key: bytes, *, skip: str = "") -> None:
        item = self._caches[t].pop(key, None)
        if item is None:
            return
        for tag in item.tags:
            if tag != skip:
                members = self._tagged.get(tag)
                if members is not None:
                    members.discard((t, key))
                    if not members:
                        del self._tagged[tag]

    def _store(
        self,
        t: int,
        key: bytes,
        body: bytes,
        expires: float,
        tags: Iterable[str],
        kind: tuple[str, str],
        bucket: int,
    ) -> None:
        cache = self._caches[t]
        if key in cache:
            self._evict(t, key)
        elif len(cache) >= self.cache_size:
            for old in list(itertools.islice(cache, max(1, self.cache_size // 8))):
                self._evict(t, old)
        item = _Cached(body, expires, tuple(tags), kind, bucket)
        cache[key] = item
        for tag in item.tags:
            self._tagged.setdefault(tag, set()).add((t, key))

    # -- rendering --------------------------------------------------------------------

    def _count(self, rcode: int) -> None:
        name = Rcode.to_text(rcode)
        self.rcodes[name] = self.rcodes.get(name, 0) + 1

    def _render(self, wire: bytes, key: bytes, tcp: bool) -> bytes | None:
        self.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except dns.message.UnknownTSIGKey:  # signed with a key we do not have (RFC 8945)
            self._count(Rcode.NOTAUTH)
            return _header_only(wire, Rcode.NOTAUTH)
        except Exception:  # DNSException mostly; some malformed input raises others
            self._count(Rcode.FORMERR)
            return _header_only(wire, Rcode.FORMERR)
        if query.flags & dns.flags.QR:
            return None
        try:
            response, tags, expires, cacheable = self._respond(query)
        except NotReadyError:
            response, tags, expires, cacheable = self._error(query, Rcode.SERVFAIL), (), 0.0, False
        except Exception:
            _log.exception("DNS: failed to answer %s", query.question)
            response, tags, expires, cacheable = self._error(query, Rcode.SERVFAIL), (), 0.0, False
        if tcp:
            limit = 65535
        elif query.edns >= 0:
            limit = min(max(query.payload, 512), self.max_udp)
        else:
            limit = 512
        if not tcp and self.max_udp_ratio:
            limit = min(limit, self.max_udp_ratio * len(wire))
        try:
            # records in the order given (discovery rank), not shuffled
            out = response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC
            try:
                out = response.to_wire(max_size=limit)
            except dns.exception.TooBig:  # e.g. EDNS padding past a small limit
                response.use_edns(False)
                out = response.to_wire(max_size=limit)
        self._count(response.rcode())
        qtype = _qtype_label(query.question[0].rdtype) if query.question else "none"
        kind = (qtype, Rcode.to_text(response.rcode()))
        self.answers[kind] = self.answers.get(kind, 0) + 1
        bucket = bisect.bisect_left(ANSWER_SIZE_BUCKETS, len(out))
        self.sizes[bucket] += 1
        self.size_sum += len(out)
        if cacheable:
            self._store(tcp, key, out[2:], expires, tags, kind, bucket)
        return out

    def _error(self, query: dns.message.Message, rcode: Rcode) -> dns.message.Message:
        response = dns.message.make_response(query, our_payload=self.max_udp)
        response.set_rcode(rcode)
        return response

    def _respond(
        self, query: dns.message.Message
    ) -> tuple[dns.message.Message, tuple[str, ...], float, bool]:
        """The response, its cache tags, its monotonic expiry, and whether to cache it."""
        if query.edns > 0:
            return self._error(query, Rcode.BADVERS), (), _INF, True
        if query.opcode() != dns.opcode.QUERY:
            return self._error(query, Rcode.NOTIMP), (), _INF, True
        if len(query.question) != 1:
            return self._error(query, Rcode.FORMERR), (), _INF, True
        q = query.question[0]
        if q.rdclass not in (_IN, dns.rdataclass.ANY) or not q.name.is_subdomain(self.zone):
            return self._error(query, Rcode.REFUSED), (), _INF, True
        if q.rdtype in _AXFR_TYPES:
            return self._error(query, Rcode.REFUSED), (), _INF, True
        response = dns.message.make_response(query, our_payload=self.max_udp)
        if query.ednsflags & dns.flags.DO:
            response.use_edns(0, dns.flags.DO, self.max_udp, query.payload, pad=response.pad)
        response.flags |= dns.flags.AA
        now = self._clock()
        found = self._lookup(q.name, now)
        node = found.node
        if node is None:
            response.set_rcode(Rcode.NXDOMAIN)
            response.authority.append(self._soa())
        else:
            if q.rdtype == dns.rdatatype.ANY:
                rrsets = [self._any(q.name, node)] if node.rrsets else []
            else:
                one = node.rrsets.get(q.rdtype)
                rrsets = [] if one is None else [one]
            # owner names are compressed to point at the question, so they keep the
            # client's spelling (case may be randomised, draft-vixie-dnsext-dns0x20)
            response.answer.extend(rrsets)
            if rrsets:
                if q.rdtype != dns.rdatatype.ANY:
                    response.additional.extend(node.additional)
            else:
                response.authority.append(self._soa())
        expires = _INF
        if found.valid_until != _INF:
            expires = self._monotonic() + max(0.0, found.valid_until - now)
        return response, found.tags, expires, True

    @staticmethod
    def _any(name: dns.name.Name, node: _Node) -> dns.rrset.RRset:
        """RFC 8482: one synthesised HINFO record stands for all of a name's RRsets.

        Its TTL is the smallest of theirs, so it never outlives what it stands for.
        """
        ttl = min(rrset.ttl for rrset in node.rrsets.values())
        hinfo = _new_hinfo(_IN, dns.rdatatype.HINFO, b"RFC8482", b"")
        return dns.rrset.from_rdata(name, ttl, hinfo)

    def _soa(self) -> dns.rrset.RRset:
        serial = self._resolver.revision & 0xFFFFFFFF
        soa = _new_soa(
            _IN,
            dns.rdatatype.SOA,
            self._ns_name,
            self._hostmaster,
            serial,
            3600,
            600,
            86400,
            self.negative_ttl,
        )
        return dns.rrset.from_rdata(self.zone, self.negative_ttl, soa)

    # -- names ------------------------------------------------------------------------

    def _lookup(self, name: dns.name.Name, now: float) -> _Lookup:
        rel = name.labels[: len(name.labels) - len(self.zone.labels)]
        try:
            labels = [label.decode("ascii").lower() for label in rel]
        except UnicodeDecodeError:
            return _Lookup(None)
        if not labels:
            return self._apex()
        if _SERVICE_LABEL in labels:
            return self._discovery(labels, now)
        if labels[0].startswith("_"):
            return self._service(labels, now)
        if len(labels) >= 4 and _EP.fullmatch(labels[0]) and "-" in labels[1]:
            return self._endpoint_host(labels, now)
        if "-" in labels[0]:
            return self._cpid_name(labels, now)
        return self._namespace(labels)

    def _apex(self) -> _Lookup:
        node = _Node()
        node.rrsets[dns.rdatatype.SOA] = self._soa()
        node.rrsets[dns.rdatatype.NS] = dns.rrset.from_rdata(
            self.zone, self.max_ttl, _new_ns(_IN, dns.rdatatype.NS, self._ns_name)
        )
        return _Lookup(node, (_tag_ns(""),))  # the SOA serial follows the revision

    def _ttl(self, entry: Entry, now: float) -> _Ttl:
        """TTL of what shows ``entry``: capped, never past its liveness or validity."""
        deadline = entry.valid_until
        if entry.live:
            expires = entry.live_expires_at
            if expires is not None:
                deadline = min(deadline, expires)
            elif entry.lease != 0:
                return _Ttl(0, now + SLACK_S)  # the lease's expiry is not known yet
        ttl = max(0, min(self.max_ttl, int(deadline - now - SLACK_S)))
        return _Ttl(ttl, deadline - ttl if deadline != _INF else _INF)

    def _entry(self, labels: list[str]) -> tuple[CPID | None, Entry | None]:
        """The CPID named by ``<serial-check>.<kind>.<prefix reversed>`` and its entry."""
        if len(labels) < 3:
            return None, None
        first, kind, *prefix = labels
        try:
            cpid = parse_cpid(f"{'.'.join(reversed(prefix))}/{kind}.{first}")
        except InvalidCPIDError:
            return None, None
        return cpid, self._resolver.get(cpid)

    def _dns_name(self, cpid: CPID) -> dns.name.Name:
        return dns.name.from_text(cpid.to_dns(self._zone_dns))

    def _cpid_name(self, labels: list[str], now: float) -> _Lookup:
        cpid, entry = self._entry(labels)
        if cpid is None:
            return _Lookup(None)
        tags = (_tag_cpid(cpid.to_text()),)
        if entry is None:
            return _Lookup(None, tags)
        t = self._ttl(entry, now)
        node = _Node()
        owner = self._dns_name(cpid)
        strings = [
            f"cpid={entry.cpid}".encode(),
            f"kid={entry.kid}".encode(),
            f"v={entry.version}".encode(),
            b"live=1" if entry.live else b"live=0",
        ]
        node.rrsets[dns.rdatatype.TXT] = dns.rrset.from_rdata(
            owner, t.ttl, _new_txt(_IN, dns.rdatatype.TXT, strings)
        )
        v4: list[Rdata] = []
        v6: list[Rdata] = []
        for ep in entry.endpoints:
            addr = _ip(ep.host)
            if addr is not None:
                (v4 if addr.version == 4 else v6).append(_address(addr))
        if v4:
            node.rrsets[dns.rdatatype.A] = dns.rrset.from_rdata_list(owner, t.ttl, v4)
        if v6:
            node.rrsets[dns.rdatatype.AAAA] = dns.rrset.from_rdata_list(owner, t.ttl, v6)
        return _Lookup(node, tags, t.valid_until)

    def _endpoint_host(self, labels: list[str], now: float) -> _Lookup:
        cpid, entry = self._entry(labels[1:])
        if cpid is None:
            return _Lookup(None)
        tags = (_tag_cpid(cpid.to_text()),)
        if entry is None:
            return _Lookup(None, tags)
        i = int(labels[0][2:])
        endpoints = entry.endpoints
        addr = _ip(endpoints[i].host) if i < len(endpoints) else None
        if addr is None:
            return _Lookup(None, tags)
        t = self._ttl(entry, now)
        owner = dns.name.Name((labels[0].encode(), *self._dns_name(cpid).labels))
        rrset = dns.rrset.from_rdata(owner, t.ttl, _address(addr))
        return _Lookup(_Node({rrset.rdtype: rrset}), tags, t.valid_until)

    def _service(self, labels: list[str], now: float) -> _Lookup:
        """``_<purpose>._<proto>.<cpid name>`` (SRV) and ``_<proto>.<cpid name>`` (empty)."""
        head = labels[:2] if len(labels) > 1 and labels[1].startswith("_") else labels[:1]
        cpid, entry = self._entry(labels[len(head) :])
        if cpid is None:
            return _Lookup(None)
        tags = (_tag_cpid(cpid.to_text()),)
        if entry is None:
            return _Lookup(None, tags)
        proto = head[-1][1:]
        purpose = head[0][1:] if len(head) == 2 else None
        owner_cpid = self._dns_name(cpid)
        t = self._ttl(entry, now)
        srv: list[Rdata] = []
        additional: list[dns.rrset.RRset] = []
        for i, ep in enumerate(entry.endpoints):
            if ep.proto != proto:
                continue
            label = _purpose_label(ep.purpose or ep.proto)
            if label is None or (purpose is not None and label != purpose):
                continue
            if purpose is None:
                return _Lookup(_Node(), tags, t.valid_until)  # an empty non-terminal
            addr = _ip(ep.host)
            if addr is not None:
                target = dns.name.Name((f"ep{i}".encode(), *owner_cpid.labels))
                additional.append(dns.rrset.from_rdata(target, t.ttl, _address(addr)))
            else:
                try:
                    target = dns.name.from_text(ep.host.rstrip(".") + ".")
                except dns.exception.DNSException:
                    continue
            srv.append(_new_srv(_IN, dns.rdatatype.SRV, 0, 0, ep.port, target))
        if not srv:
            return _Lookup(None, tags)
        owner = dns.name.Name((*(h.encode() for h in head), *owner_cpid.labels))
        node = _Node({dns.rdatatype.SRV: dns.rrset.from_rdata_list(owner, t.ttl, srv)})
        node.additional = additional
        return _Lookup(node, tags, t.valid_until)

    def _exists(self, query: Query) -> bool:
        return bool(self._resolver.discover(query).results)

    def _namespace(self, labels: list[str]) -> _Lookup:
        """``<prefix reversed>`` and ``<kind>.<prefix reversed>``: empty non-terminals."""
        try:
            ns = parse_namespace(".".join(reversed(labels)))
        except InvalidCPIDError:
            return _Lookup(None)
        tags: list[str] = [_tag_ns(ns)]
        exists = self._exists(Query(within=ns, limit=1))
        if not exists and len(labels) >= 2 and labels[0].upper() in _KIND_SET:
            parent = ns.rpartition(".")[0]
            tags.append(_tag_ns(parent))
            exists = self._exists(Query(kind=labels[0].upper(), within=parent, limit=1))
        return _Lookup(_Node() if exists else None, tuple(tags))

    def _discovery(self, labels: list[str], now: float) -> _Lookup:
        """``[_<model>.]_<kind>._cpi.<prefix reversed>``: PTR to CPID names, ranked."""
        i = labels.index(_SERVICE_LABEL)
        head, rest = labels[:i], labels[i + 1 :]
        if len(head) > 2 or any(lab.startswith("_") for lab in rest):
            return _Lookup(None)
        if not all(lab.startswith("_") and len(lab) > 1 for lab in head):
            return _Lookup(None)
        ns: str | None = None
        if rest:
            try:
                ns = parse_namespace(".".join(reversed(rest)))
            except InvalidCPIDError:
                return _Lookup(None)
        tags = (_tag_ns(ns or ""),)
        if ns is not None and not self._exists(Query(within=ns, limit=1)):
            return _Lookup(None, tags)
        if not head:
            return _Lookup(_Node(), tags)
        kind = head[-1][1:].upper()
        if kind not in _KIND_SET:
            return _Lookup(None)
        model = head[0][1:] if len(head) == 2 else None
        found = self._resolver.discover(
            Query(kind=kind, within=ns, accelerator=model, limit=self.discovery_limit)
        )
        if not found.results:
            return _Lookup(_Node(), tags)
        ttl, valid_until = self.max_ttl, _INF
        for match in found.results:
            t = self._ttl(match.entry, now)
            ttl = min(ttl, t.ttl)
            valid_until = min(valid_until, t.valid_until)
        owner = dns.name.Name(
            (*(h.encode() for h in head), _SERVICE_LABEL.encode(), *self._ns_labels(ns))
        )
        ptrs: list[Rdata] = [
            _new_ptr(_IN, dns.rdatatype.PTR, self._dns_name(m.entry.id)) for m in found.results
        ]
        rrset = dns.rrset.from_rdata_list(owner, ttl, ptrs)
        return _Lookup(_Node({dns.rdatatype.PTR: rrset}), tags, valid_until)

    def _ns_labels(self, ns: str | None) -> tuple[bytes, ...]:
        segs = tuple(s.lower().encode() for s in reversed(ns.split("."))) if ns else ()
        return (*segs, *self.zone.labels)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address if ``host`` is an IP literal (IPv6 with or without brackets)."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Rdata:
    if addr.version == 4:
        return _new_a(_IN, dns.rdatatype.A, str(addr))
    return _new_aaaa(_IN, dns.rdatatype.AAAA, str(addr))


def _purpose_label(purpose: str) -> str | None:
    """The SRV service label (without ``_``) for an endpoint purpose, or None if none fits."""
    low = purpose.lower()
    return low if _PURPOSE.fullmatch(low) else None

"""The DNS front end against the real etcd, with dnspython as the client (UDP and TCP)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest

from cpi.etcdproc import EtcdProcess
from registry import ca
from registry.index import Index, Keys
from resolver.core import Resolver
from resolver.discovery import Query
from resolver.dns.answerer import DISCOVERY_LIMIT, MAX_TTL, NEGATIVE_TTL, DnsAnswerer
from resolver.dns.server import DnsServer, start_dns
from resolver.http import DNS, RESOLVER, create_app
from schemas import dsse, keys
from schemas.cpid import derive
from schemas.cpid import parse as parse_cpid
from schemas.models import Endpoint
from tests.resolver.kit import Node, Pki, put_record, put_status, resolver_config, signed
from tests.until import until

HOST = "127.0.0.1"
ZONE = "cpi."
Rcode = dns.rcode.Rcode


@pytest.fixture
async def server(resolver: Resolver) -> AsyncIterator[DnsServer]:
    srv = await start_dns(resolver, host=HOST, port=0, zone=ZONE)
    try:
        yield srv
    finally:
        await srv.close()


def name_of(cpid: str) -> str:
    return parse_cpid(cpid).to_dns(ZONE)


async def ask(
    srv: DnsServer,
    name: str,
    rdtype: str = "TXT",
    *,
    tcp: bool = False,
    edns: int = -1,
    payload: int = 1232,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload)
    if tcp:
        return await dns.asyncquery.tcp(query, HOST, timeout=3, port=srv.port)
    return await dns.asyncquery.udp(query, HOST, timeout=3, port=srv.port)


def txt(resp: dns.message.Message) -> list[str]:
    [rrset] = resp.answer
    [rdata] = list(rrset)
    return [s.decode() for s in rdata.strings]


async def served(resolver: Resolver, cpid: str, version: int = 1) -> None:
    def ok() -> bool:
        e = resolver.get(cpid)
        return e is not None and e.version == version

    await until(ok, what=f"{cpid} v{version} to be served")


async def publish(index: Index, pki: Pki, resolver: Resolver, node: Node, **changes: Any) -> None:
    await put_record(index, pki, node, **changes)
    await served(resolver, node.cpid, changes.get("version", 1))


def soa_in_authority(resp: dns.message.Message) -> dns.rrset.RRset:
    [soa] = resp.authority
    assert soa.rdtype == dns.rdatatype.SOA and soa.name == dns.name.from_text(ZONE)
    assert soa.ttl == NEGATIVE_TTL
    return soa


# -- records ------------------------------------------------------------------------------


async def test_txt_for_a_verified_cpid(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    node = Node()
    await publish(index, pki, resolver, node)
    name = name_of(node.cpid)
    assert name.endswith(".gpu.cmcc.31.cn.cpi.")
    for tcp in (False, True):
        resp = await ask(server, name, tcp=tcp)
        assert resp.rcode() == Rcode.NOERROR
        assert resp.flags & dns.flags.AA and resp.flags & dns.flags.QR
        assert txt(resp) == [f"cpid={node.cpid}", f"kid={pki.kid('CN.31.CMCC')}", "v=1", "live=0"]
        assert resp.answer[0].ttl == MAX_TTL  # not live: the cap
    # names are case-insensitive and the answer keeps the question's spelling
    upper = await ask(server, name.upper())
    assert txt(upper)[0] == f"cpid={node.cpid}"
    assert upper.answer[0].name.to_text() == name.upper()
    # a live node says so
    await put_status(index, node, free=3)
    await until(lambda: resolver.get(node.cpid).live, what="the status")  # type: ignore[union-attr]
    assert "live=1" in txt(await ask(server, name))


async def test_srv_and_address_records_for_endpoints(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    node = Node()
    endpoints = [
        Endpoint(proto="https", host="10.1.2.3", port=8443, purpose="inference"),
        Endpoint(proto="grpc", host="[2001:db8::5]", port=50051, purpose="K8s-API"),
        Endpoint(proto="ssh", host="login.example.test", port=22, purpose=""),
    ]
    await publish(index, pki, resolver, node, endpoints=endpoints)
    name = name_of(node.cpid)

    resp = await ask(server, f"_inference._https.{name}", "SRV")
    assert resp.rcode() == Rcode.NOERROR and resp.flags & dns.flags.AA
    [srv] = list(resp.answer[0])
    assert (srv.priority, srv.weight, srv.port) == (0, 0, 8443)
    assert srv.target.to_text() == f"ep0.{name}"
    [glue] = resp.additional  # the target's address comes along
    assert glue.name == srv.target and [r.address for r in glue] == ["10.1.2.3"]

    resp = await ask(server, f"_k8s-api._grpc.{name}", "SRV")
    [srv] = list(resp.answer[0])
    assert (srv.port, srv.target.to_text()) == (50051, f"ep1.{name}")
    resp = await ask(server, f"ep1.{name}", "AAAA")
    assert [r.address for r in resp.answer[0]] == ["2001:db8::5"]

    resp = await ask(server, f"_ssh._ssh.{name}", "SRV")  # no purpose: the proto stands in
    [srv] = list(resp.answer[0])
    assert (srv.port, srv.target.to_text()) == (22, "login.example.test.")
    assert resp.additional == []

    assert [r.address for r in (await ask(server, name, "A")).answer[0]] == ["10.1.2.3"]
    assert [r.address for r in (await ask(server, name, "AAAA")).answer[0]] == ["2001:db8::5"]
    assert [r.address for r in (await ask(server, f"ep0.{name}", "A")).answer[0]] == ["10.1.2.3"]

    # names that exist without the asked type: NODATA with the SOA
    for qname, rdtype in ((f"_https.{name}", "SRV"), (f"ep0.{name}", "AAAA"), (name, "MX")):
        resp = await ask(server, qname, rdtype)
        assert (resp.rcode(), resp.answer) == (Rcode.NOERROR, []), qname
        soa_in_authority(resp)
    # and names that do not exist
    for qname, rdtype in (
        (f"_inference._grpc.{name}", "SRV"),
        (f"_http.{name}", "SRV"),
        (f"ep2.{name}", "A"),  # a host name, not an IP literal
        (f"ep9.{name}", "A"),
    ):
        resp = await ask(server, qname, rdtype)
        assert resp.rcode() == Rcode.NXDOMAIN, qname
        soa_in_authority(resp)

    # ANY: one synthesised HINFO (RFC 8482), over UDP and TCP alike
    for tcp in (False, True):
        any_resp = await ask(server, name, "ANY", tcp=tcp)
        [rrset] = any_resp.answer
        assert rrset.rdtype == dns.rdatatype.HINFO and rrset[0].cpu == b"RFC8482"
        assert any_resp.additional == []


# -- discovery ----------------------------------------------------------------------------


async def test_discovery_names_list_cpids_ranked_like_discovery(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    cmcc = [Node(model="H100") for _ in range(3)]
    a800 = Node(namespace="CN.32", region="32", model="A800")
    npu = Node(kind="NPU", model="910B")
    cpu = Node(namespace="CN.3", region="31", kind="CPU", count=0)
    for node in (*cmcc, a800, npu, cpu):
        await put_record(index, pki, node)
    for node, free in zip(cmcc, (1, 8, 4), strict=True):
        await put_status(index, node, free=free)
    await until(lambda: len(resolver.discover(Query(min_free=1)).results) == 3, what="statuses")
    for node in (a800, npu, cpu):
        await served(resolver, node.cpid)

    async def ptrs(qname: str) -> list[str]:
        resp = await ask(server, qname, "PTR")
        assert resp.rcode() == Rcode.NOERROR and resp.flags & dns.flags.AA, qname
        # targets are compressed against the question, so they take its case
        return [r.target.to_text().lower() for rrset in resp.answer for r in rrset]

    expected = [
        name_of(m.cpid) for m in resolver.discover(Query(kind="GPU", within="CN.31")).results
    ]
    assert expected == [name_of(n.cpid) for n in (cmcc[1], cmcc[2], cmcc[0])]  # most free first
    assert await ptrs("_gpu._cpi.31.cn.cpi.") == expected
    assert await ptrs("_GPU._CPI.31.CN.CPI.") == expected
    assert await ptrs("_h100._gpu._cpi.cn.cpi.") == expected
    assert await ptrs("_a800._gpu._cpi.cn.cpi.") == [name_of(a800.cpid)]
    assert await ptrs("_a800._gpu._cpi.32.cn.cpi.") == [name_of(a800.cpid)]
    assert await ptrs("_npu._cpi.cpi.") == [name_of(npu.cpid)]  # the whole zone
    assert await ptrs("_910b._npu._cpi.cmcc.31.cn.cpi.") == [name_of(npu.cpid)]
    # segment-wise: CN.3 does not contain CN.31
    assert await ptrs("_cpu._cpi.3.cn.cpi.") == [name_of(cpu.cpid)]
    for empty in ("_gpu._cpi.3.cn.cpi.", "_a800._gpu._cpi.31.cn.cpi.", "_cpi.31.cn.cpi."):
        resp = await ask(server, empty, "PTR")
        assert (resp.rcode(), resp.answer) == (Rcode.NOERROR, []), empty
        soa_in_authority(resp)
    # a namespace with nothing in it, and a kind that does not exist
    for missing in ("_gpu._cpi.51.cn.cpi.", "_tpu._cpi.31.cn.cpi.", "_x._y._gpu._cpi.cn.cpi."):
        resp = await ask(server, missing, "PTR")
        assert resp.rcode() == Rcode.NXDOMAIN, missing
        soa_in_authority(resp)


async def test_namespaces_and_kinds_are_empty_non_terminals(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    node = Node()
    await publish(index, pki, resolver, node)
    # RFC 8020: NXDOMAIN means nothing below, so the parents of a served name are NODATA
    for ent in ("cn.cpi.", "31.cn.cpi.", "cmcc.31.cn.cpi.", "gpu.cmcc.31.cn.cpi."):
        resp = await ask(server, ent, "A")
        assert (resp.rcode(), resp.answer) == (Rcode.NOERROR, []), ent
        soa_in_authority(resp)
    for missing in ("32.cn.cpi.", "npu.cmcc.31.cn.cpi.", "us.cpi."):
        assert (await ask(server, missing, "A")).rcode() == Rcode.NXDOMAIN, missing
    apex = await ask(server, ZONE, "SOA")
    assert apex.rcode() == Rcode.NOERROR and apex.answer[0].rdtype == dns.rdatatype.SOA
    ns = await ask(server, ZONE, "NS")
    assert [r.target.to_text() for r in ns.answer[0]] == ["ns.cpi."]


# -- errors -------------------------------------------------------------------------------


async def test_unknown_names_get_nxdomain_with_the_soa(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    unknown = derive("CN.31.CMCC", "GPU", keys.public_raw(keys.generate())).to_text()
    bad_check = name_of(unknown)
    bad_check = bad_check[:13] + ("0" if bad_check[13] != "0" else "1") + bad_check[14:]
    for qname in (name_of(unknown), bad_check, "nope.cpi.", "a-b.gpu.cn.cpi.", "_x.cpi."):
        for tcp in (False, True):
            resp = await ask(server, qname, tcp=tcp)
            assert resp.rcode() == Rcode.NXDOMAIN, qname
            assert resp.flags & dns.flags.AA and resp.answer == []
            soa = soa_in_authority(resp)
            assert soa[0].minimum == NEGATIVE_TTL


async def test_names_outside_the_zone_are_refused(server: DnsServer) -> None:
    node_name = derive("CN.31.CMCC", "GPU", keys.public_raw(keys.generate())).to_dns("xcpi")
    for qname in ("example.com.", node_name, "cpi.example.", "."):
        for tcp in (False, True):
            resp = await ask(server, qname, tcp=tcp)
            assert resp.rcode() == Rcode.REFUSED, qname
            assert not resp.flags & dns.flags.AA and resp.answer == []
    assert (await ask(server, ZONE, "AXFR", tcp=True)).rcode() == Rcode.REFUSED


async def _udp_exchange(port: int, payload: bytes, wait: float = 1.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (HOST, port))
        await loop.sock_sendall(s, payload)
        try:
            async with asyncio.timeout(wait):
                return await loop.sock_recv(s, 65535)
        except TimeoutError:
            return None


async def test_malformed_queries_get_formerr_and_responses_are_ignored(
    resolver: Resolver, server: DnsServer
) -> None:
    # a header announcing one question, then a label running past the end
    garbage = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x05ab"
    out = await _udp_exchange(server.port, garbage)
    assert out is not None
    resp = dns.message.from_wire(out)
    assert resp.id == 0xBEEF and resp.rcode() == Rcode.FORMERR and resp.flags & dns.flags.QR
    # two questions
    q = dns.message.make_query("cpi.", "SOA")
    q.question.append(
        dns.rrset.RRset(dns.name.from_text("x.cpi."), dns.rdataclass.IN, dns.rdatatype.A)
    )
    resp = dns.message.from_wire(await _udp_exchange(server.port, q.to_wire()) or b"")
    assert resp.rcode() == Rcode.FORMERR
    # something that is a response, or too short to be a query: no answer at all
    reply = dns.message.make_response(dns.message.make_query("cpi.", "SOA"))
    assert await _udp_exchange(server.port, reply.to_wire(), wait=0.3) is None
    assert await _udp_exchange(server.port, b"\x00\x01\x02", wait=0.3) is None
    # unsupported opcode and EDNS version
    notify = dns.message.make_query("cpi.", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    resp = await dns.asyncquery.udp(notify, HOST, timeout=3, port=server.port)
    assert resp.rcode() == Rcode.NOTIMP
    v1 = dns.message.make_query("cpi.", "SOA", use_edns=1)
    resp = await dns.asyncquery.udp(v1, HOST, timeout=3, port=server.port)
    assert resp.rcode() == Rcode.BADVERS and resp.edns == 0
    # another class; a TSIG key we do not have (RFC 8945: NOTAUTH)
    chaos = dns.message.make_query("cpi.", "SOA", rdclass="CH")
    resp = await dns.asyncquery.udp(chaos, HOST, timeout=3, port=server.port)
    assert resp.rcode() == Rcode.REFUSED
    tsig = dns.message.make_query("cpi.", "SOA")
    tsig.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"}), "k.")
    wire = tsig.to_wire()
    out = await _udp_exchange(server.port, wire)
    assert out is not None and out[:2] == wire[:2] and out[3] & 0x0F == Rcode.NOTAUTH


# -- size limits --------------------------------------------------------------------------


async def test_truncation_over_udp_then_the_full_answer_over_tcp(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    nodes = [Node(namespace="CN.32", region="32") for _ in range(DISCOVERY_LIMIT + 5)]
    await asyncio.gather(*(put_record(index, pki, n) for n in nodes))
    await until(
        lambda: len(resolver.discover(Query(within="CN.32", limit=100)).results) == len(nodes),
        what="all records",
    )
    qname = "_gpu._cpi.32.cn.cpi."
    full = await ask(server, qname, "PTR", tcp=True)
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == DISCOVERY_LIMIT  # capped, best first
    size = len(full.to_wire())
    assert size > 512

    plain = await ask(server, qname, "PTR")  # no EDNS: 512 bytes
    assert plain.flags & dns.flags.TC and plain.answer == [] and plain.edns == -1
    assert plain.rcode() == Rcode.NOERROR and plain.question == full.question

    # more than 10 times the query's size: truncated whatever the EDNS payload size
    query_size = len(dns.message.make_query(qname, "PTR", use_edns=0).to_wire())
    assert size + 11 > 10 * query_size
    big = await ask(server, qname, "PTR", edns=0, payload=4096)
    assert big.flags & dns.flags.TC and big.answer == [] and big.edns == 0

    # EDNS: the client's payload size is honoured, and our OPT comes back
    size_edns = size + 11  # the OPT record
    async with DnsServer(resolver, host=HOST, port=0, zone=ZONE, max_udp_ratio=0) as unbound:
        small = await ask(unbound, qname, "PTR", edns=0, payload=size_edns - 1)
        assert small.flags & dns.flags.TC and small.answer == []
        assert small.edns == 0 and small.payload == 1232
        fits = await ask(unbound, qname, "PTR", edns=0, payload=size_edns)
        assert not fits.flags & dns.flags.TC
        assert [r.target for r in fits.answer[0]] == [r.target for r in full.answer[0]]
        assert fits.edns == 0 and fits.payload == 1232
    # the DO bit is copied
    do = dns.message.make_query(qname, "PTR", want_dnssec=True)
    resp = await dns.asyncquery.tcp(do, HOST, timeout=3, port=server.port)
    assert resp.ednsflags & dns.flags.DO
    # a payload below 512 counts as 512
    tiny = await ask(server, "_gpu._cpi.32.cn.cpi.", "PTR", edns=0, payload=100)
    assert tiny.flags & dns.flags.TC


# -- TTLs ---------------------------------------------------------------------------------


async def test_ttls_never_exceed_the_remaining_liveness(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    node = Node(namespace="CN.32", region="32")
    lease = await index.grant_lease(12)  # not kept alive: liveness runs out
    await put_record(index, pki, node, endpoints=[Endpoint(proto="tcp", host="10.0.0.7", port=9)])
    await put_status(index, node, free=2, lease=lease.id)

    def known() -> bool:
        e = resolver.get(node.cpid)
        return e is not None and e.live and e.live_expires_at is not None

    await until(known, what="the lease's expiry to be known")
    name = name_of(node.cpid)
    first: list[int] = []
    for qname, rdtype in ((name, "TXT"), (name, "A"), ("_gpu._cpi.32.cn.cpi.", "PTR")):
        resp = await ask(server, qname, rdtype)
        remaining = await lease.time_to_live()
        ttl = resp.answer[0].ttl
        assert 0 < ttl <= remaining <= 12, (qname, ttl, remaining)
        first.append(ttl)
    await asyncio.sleep(2.2)  # cached answers must not keep their old TTLs
    for (qname, rdtype), before in zip(
        ((name, "TXT"), (name, "A"), ("_gpu._cpi.32.cn.cpi.", "PTR")), first, strict=True
    ):
        resp = await ask(server, qname, rdtype)
        remaining = await lease.time_to_live()
        assert resp.answer[0].ttl <= min(remaining, before - 1), qname
    # a node without liveness gets the cap
    other = Node(namespace="CN.32", region="32")
    await publish(index, pki, resolver, other)
    assert (await ask(server, name_of(other.cpid))).answer[0].ttl == MAX_TTL


# -- never served -------------------------------------------------------------------------


async def test_forged_and_tampered_records_never_appear(
    index: Index, pki: Pki, resolver: Resolver, server: DnsServer
) -> None:
    good = Node()
    await publish(index, pki, resolver, good)
    forged = Node()
    stranger = ca.sign_document(forged.record(), keys.generate())
    outside = Node()
    rev1 = await index.put(Keys.rec(forged.cpid), stranger.to_json())
    rev2 = await index.put(Keys.rec(outside.cpid), signed(pki, outside.record(), "CN.32").to_json())
    await until(lambda: resolver.revision >= max(rev1, rev2), what="the writes")
    for node in (forged, outside):
        resp = await ask(server, name_of(node.cpid))
        assert resp.rcode() == Rcode.NXDOMAIN
    listed = await ask(server, "_gpu._cpi.cn.cpi.", "PTR")
    assert [r.target.to_text() for r in listed.answer[0]] == [name_of(good.cpid)]

    # the good one, cached, then tampered with in etcd: it disappears from DNS
    assert txt(await ask(server, name_of(good.cpid)))[0] == f"cpid={good.cpid}"
    env = signed(pki, good.record(version=2))
    tampered = dsse.Envelope(
        env.payload_type, env.payload.replace(b'"count":8', b'"count":9'), env.signatures
    )
    rev = await index.put(Keys.rec(good.cpid), tampered.to_json())
    await until(lambda: resolver.revision >= rev, what="the tampered write")
    assert resolver.get(good.cpid) is None
    assert (await ask(server, name_of(good.cpid))).rcode() == Rcode.NXDOMAIN
    listed = await ask(server, "_gpu._cpi.cn.cpi.", "PTR")
    assert listed.rcode() == Rcode.NXDOMAIN  # nothing is served under CN any more


# -- cache --------------------------------------------------------------------------------


async def test_cached_answers_carry_the_query_id_and_follow_changes(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = Node()
    await publish(index, pki, resolver, node)
    answerer = DnsAnswerer(resolver, zone=ZONE)
    try:
        query = dns.message.make_query(name_of(node.cpid), "TXT")
        ids = [7, 0xFFFF, 12345]
        answers = []
        for qid in ids:
            query.id = qid
            out = answerer.answer(query.to_wire())
            assert out is not None
            answers.append(out)
        assert [dns.message.from_wire(a).id for a in answers] == ids
        assert len({a[2:] for a in answers}) == 1 and answerer.hits == 2
        assert "v=1" in txt(dns.message.from_wire(answers[0]))

        # the record changes: the next answer is rendered again and shows it
        await put_record(index, pki, node, version=2)
        await served(resolver, node.cpid, 2)
        query.id = 99
        resp = dns.message.from_wire(answerer.answer(query.to_wire()) or b"")
        assert resp.id == 99 and "v=2" in txt(resp)
        assert answerer.hits == 2

        # an unknown CPID's NXDOMAIN is cached, and dropped when the CPID appears
        later = Node()
        nx = dns.message.make_query(name_of(later.cpid), "TXT")
        assert dns.message.from_wire(answerer.answer(nx.to_wire()) or b"").rcode() == (
            Rcode.NXDOMAIN
        )
        assert dns.message.from_wire(answerer.answer(nx.to_wire()) or b"").rcode() == (
            Rcode.NXDOMAIN
        )
        assert answerer.hits == 3
        await publish(index, pki, resolver, later)
        assert txt(dns.message.from_wire(answerer.answer(nx.to_wire()) or b""))[0].endswith(
            later.cpid
        )
        stats = answerer.stats()
        assert stats["cache_hits"] == 3 and stats["queries"] == 7
    finally:
        answerer.close()


async def test_the_cache_is_bounded(index: Index, pki: Pki, resolver: Resolver) -> None:
    answerer = DnsAnswerer(resolver, zone=ZONE, cache_size=64)
    try:
        for i in range(500):
            answerer.answer(dns.message.make_query(f"n{i}.cpi.", "A").to_wire())
        assert 0 < answerer.stats()["cached"] <= 64
    finally:
        answerer.close()


async def test_answers_before_the_first_listing_are_servfail(index: Index, pki: Pki) -> None:
    from tests.resolver.kit import make_resolver

    r = make_resolver(index, pki)  # never started: not ready
    answerer = DnsAnswerer(r, zone=ZONE)
    query = dns.message.make_query("_gpu._cpi.cpi.", "PTR")
    resp = dns.message.from_wire(answerer.answer(query.to_wire()) or b"")
    assert resp.rcode() == Rcode.SERVFAIL
    assert answerer.stats()["cached"] == 0
    answerer.close()


# -- TCP ----------------------------------------------------------------------------------


async def test_tcp_answers_several_queries_per_connection_and_closes_when_idle(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = Node()
    await publish(index, pki, resolver, node)
    async with DnsServer(resolver, host=HOST, port=0, zone=ZONE, tcp_idle_s=0.5) as srv:
        reader, writer = await asyncio.open_connection(HOST, srv.port)
        try:
            queries = [
                dns.message.make_query(name_of(node.cpid), "TXT"),
                dns.message.make_query("nope.cpi.", "A"),
                dns.message.make_query("example.com.", "A"),
            ]
            writer.write(b"".join(q.to_wire(prepend_length=True) for q in queries))  # pipelined
            await writer.drain()
            rcodes = []
            for q in queries:
                size = int.from_bytes(await reader.readexactly(2), "big")
                resp = dns.message.from_wire(await reader.readexactly(size))
                assert resp.id == q.id
                rcodes.append(resp.rcode())
            assert rcodes == [Rcode.NOERROR, Rcode.NXDOMAIN, Rcode.REFUSED]
            # idle: the server closes the connection
            async with asyncio.timeout(3):
                assert await reader.read() == b""
        finally:
            writer.close()


async def _connect_from(
    source: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, port, local_addr=(source, 0))


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            return await reader.read() == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_idle_tcp_connections_do_not_lock_out_other_clients(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = Node()
    await publish(index, pki, resolver, node)
    async with DnsServer(resolver, host=HOST, port=0, zone=ZONE, tcp_idle_s=1.5) as srv:
        conns = []
        for _ in range(6):  # in batches, within the listen backlog
            conns += await asyncio.gather(*(_connect_from(HOST, srv.port) for _ in range(50)))
        try:
            # over the per-address cap (16): closed at once
            await until(lambda: srv.stats()["tcp_refused"] == 284, what="284 refused")
            closed = await asyncio.gather(*(_closed(r, 0.5) for r, _ in conns))
            assert sum(closed) == 300 - 16
            assert srv.stats()["tcp_open"] == 16 and srv.stats()["tcp_refused"] == 284
            # another client address is answered
            query = dns.message.make_query(name_of(node.cpid), "TXT")
            resp = await dns.asyncquery.tcp(
                query, HOST, port=srv.port, source="127.0.0.2", timeout=3
            )
            assert txt(resp)[0] == f"cpid={node.cpid}"
            # the 16 idle ones are closed after the idle timeout
            kept = [r for (r, _), c in zip(conns, closed, strict=True) if not c]
            assert len(kept) == 16
            assert all(await asyncio.gather(*(_closed(r, 3.0) for r in kept)))
            await until(lambda: srv.stats()["tcp_open"] == 0, what="all closed")
            assert srv.stats()["tcp_idle_closed"] >= 16
            # and then the first address is served again
            resp = await dns.asyncquery.tcp(query, HOST, port=srv.port, timeout=3)
            assert resp.rcode() == Rcode.NOERROR
        finally:
            for _, w in conns:
                w.close()


async def test_the_total_tcp_cap_closes_further_connections(resolver: Resolver) -> None:
    async with DnsServer(
        resolver, host=HOST, port=0, zone=ZONE, max_tcp_clients=4, max_tcp_per_client=3
    ) as srv:
        conns = [await _connect_from(f"127.0.0.{i}", srv.port) for i in (1, 1, 1, 1, 2, 3)]
        try:
            closed = await asyncio.gather(*(_closed(r, 0.5) for r, _ in conns))
            # 3 from .1 (the 4th over the per-address cap), 1 from .2, then the total cap
            assert closed == [False, False, False, True, False, True]
        finally:
            for _, w in conns:
                w.close()


# -- response rate limiting ---------------------------------------------------------------


async def _udp_burst(port: int, source: str, wires: list[bytes], wait: float = 0.5) -> list[bytes]:
    """Send ``wires`` from one socket bound to ``source``; the answers received by ``wait``."""
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.setblocking(False)
        await loop.sock_connect(s, (HOST, port))
        for wire in wires:
            await loop.sock_sendall(s, wire)
        try:
            async with asyncio.timeout(wait):
                while len(got) < len(wires):
                    got.append(await loop.sock_recv(s, 65535))
        except TimeoutError:
            pass
    return got


async def test_udp_responses_are_rate_limited_per_prefix_with_slip(
    index: Index, pki: Pki, resolver: Resolver
) -> None:
    node = Node()
    await publish(index, pki, resolver, node)
    async with DnsServer(
        resolver, host=HOST, port=0, zone=ZONE, rrl_responses_per_s=5, rrl_slip=2
    ) as srv:
        queries = [dns.message.make_query(name_of(node.cpid), "TXT") for _ in range(25)]
        got = [
            dns.message.from_wire(w)
            for w in await _udp_burst(srv.port, "127.0.0.1", [q.to_wire() for q in queries])
        ]
        full = [r for r in got if not r.flags & dns.flags.TC]
        slipped = [r for r in got if r.flags & dns.flags.TC]
        # 5 from the bucket (maybe one more if a refill lands), then every 2nd of the rest
        assert 5 <= len(full) <= 6 and all(txt(r)[0] == f"cpid={node.cpid}" for r in full)
        assert 9 <= len(slipped) <= 10
        assert all(r.answer == [] and r.question == queries[0].question for r in slipped)
        stats = srv.stats()
        assert stats["rrl_limited"] == 25 - len(full)
        assert stats["rrl_slipped"] == len(slipped)
        assert stats["rrl_dropped"] == stats["rrl_limited"] - len(slipped)
        # another /24 has its own bucket (127.0.0.2 would share 127.0.0.1's)
        other = await _udp_burst(srv.port, "127.0.1.1", [q.to_wire() for q in queries[:3]])
        assert len(other) == 3 and not any(
            dns.message.from_wire(w).flags & dns.flags.TC for w in other
        )
        # TCP is not rate limited: the slipped client gets its answer there
        resp = await ask(srv, name_of(node.cpid), tcp=True)
        assert txt(resp)[0] == f"cpid={node.cpid}"
    # 0 turns rate limiting off
    async with DnsServer(resolver, host=HOST, port=0, zone=ZONE, rrl_responses_per_s=0) as srv:
        got_all = await _udp_burst(
            srv.port, "127.0.0.1", [q.to_wire() for q in queries] * 4, wait=2.0
        )
        assert len(got_all) == 100
        assert not any(dns.message.from_wire(w).flags & dns.flags.TC for w in got_all)
        assert srv.stats()["rrl_limited"] == 0


# -- in the service -----------------------------------------------------------------------


async def test_the_resolver_service_runs_dns_when_configured(
    index: Index, pki: Pki, anchor_file: Path, etcd_server: EtcdProcess, aiohttp_client: Any
) -> None:
    await pki.publish(index)
    node = Node()
    await put_record(index, pki, node)
    config = resolver_config(etcd_server.endpoint, anchor_file, dns_port=0, zone="CPI")
    client = await aiohttp_client(create_app(config))
    srv = client.app[DNS]
    assert srv.port != 0
    await until(lambda: client.app[RESOLVER].ready, what="ready")
    await served(client.app[RESOLVER], node.cpid)
    resp = await ask(srv, name_of(node.cpid))
    assert txt(resp)[0] == f"cpid={node.cpid}"
    resp = await ask(srv, name_of(node.cpid))  # from the cache: counted by type too
    assert srv.rrl_responses_per_s == 50 and srv.max_tcp_per_client == 16
    # the DNS counters are in /metrics
    metrics = await (await client.get("/metrics")).text()
    assert 'cpi_resolver_dns_answers_total{qtype="TXT",rcode="NOERROR"} 2.0' in metrics
    assert 'cpi_resolver_dns_answer_bytes_bucket{le="+Inf"} 2.0' in metrics
    assert "cpi_resolver_dns_answer_bytes_sum" in metrics
    for counter in ("rrl_limited", "rrl_slipped", "tcp_refused", "tcp_idle_closed"):
        assert f"cpi_resolver_dns_{counter}_total 0.0" in metrics, counter
    assert "cpi_resolver_dns_cache_hits_total" in metrics
    # without a DNS port there is no DNS front end
    plain = create_app(resolver_config(etcd_server.endpoint, anchor_file))
    assert DNS not in plain


def test_cpi_resolver_serve_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from cpi.commands import resolver as command
    from resolver.config import ResolverConfig, load_config

    seen: list[ResolverConfig] = []

    async def fake_serve(config: ResolverConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(command, "serve", fake_serve)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    argv = ["resolver", "serve", "--anchor", "a.json", "--dns-port", "8853", "--zone", "cpi."]
    args = parser.parse_args(argv)  # what `cpi up` passes
    assert args.handler(args) == 0
    [config] = seen
    assert (config.dns_port, config.dns_host, config.zone) == (8853, "127.0.0.1", "cpi.")
    assert load_config(data={"anchor_files": ["a.json"]}, env={}).dns_port is None
    limits = load_config(
        data={"anchor_files": ["a.json"], "dns_rrl_responses_per_s": 0, "dns_tcp_idle_s": 2.5},
        env={},
    )
    assert (limits.dns_rrl_responses_per_s, limits.dns_rrl_slip) == (0, 2)
    assert (limits.dns_tcp_idle_s, limits.dns_tcp_max_per_client) == (2.5, 16)

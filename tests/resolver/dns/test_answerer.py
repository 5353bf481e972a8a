"""The DNS answerer alone: query bytes in, answer bytes out, no sockets, an injected clock.

The answerer reads a :class:`ReplicaState` fed directly (no etcd) through a small view
with the resolver's reading surface; both run on one fake clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry.index import Keys
from resolver.core import DiscoveryResult
from resolver.discovery import Query
from resolver.dns.answerer import MAX_TTL, NEGATIVE_TTL, DnsAnswerer, truncated
from resolver.entry import Entry
from resolver.errors import NotReadyError
from resolver.events import Event
from resolver.state import Change, ReplicaState
from resolver.verify import Context, Job, Outcome, run_jobs
from schemas.cpid import CPID
from schemas.cpid import parse as parse_cpid
from tests.resolver.kit import Node, Pki, signed


async def inline(ctx: Context, jobs: Sequence[Job]) -> AsyncIterator[list[Outcome]]:
    yield run_jobs(ctx, jobs)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.mono = 1000.0

    def wall(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono


class View:
    """The resolver's reading surface over a bare replica state."""

    def __init__(self, state: ReplicaState) -> None:
        self.state = state
        self.ready = True

    @property
    def revision(self) -> int:
        return self.state.revision

    @property
    def generation(self) -> int:
        return self.state.generation

    def get(self, cpid: str | CPID) -> Entry | None:
        if not self.ready:
            raise NotReadyError("not ready")
        text = cpid.to_text() if isinstance(cpid, CPID) else parse_cpid(cpid).to_text()
        return self.state.get(text)

    def discover(self, query: Query) -> DiscoveryResult:
        if not self.ready:
            raise NotReadyError("not ready")
        return DiscoveryResult(self.state.discovery.search(query), self.state.revision, False)

    def add_listener(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        self.state.listeners.append(callback)
        return lambda: self.state.listeners.remove(callback)


class World:
    def __init__(self, pki: Pki, clock: Clock) -> None:
        self.pki = pki
        self.clock = clock
        self.state = ReplicaState(anchors=pki.anchors, clock=clock.wall)
        self.view = View(self.state)
        self.rev = 1
        self.answerer = DnsAnswerer(self.view, clock=clock.wall, monotonic=clock.monotonic)

    async def put(self, key: str, value: bytes) -> None:
        self.rev += 1
        await self.state.apply([Change("put", key, value, self.rev)], self.rev, check=inline)

    async def node(self) -> Node:
        node = Node()
        await self.put(Keys.rec(node.cpid), signed(self.pki, node.record()).to_json())
        return node

    def ask(self, name: str, rdtype: str = "TXT", **kw: object) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
        out = self.answerer.answer(q.to_wire())
        assert out is not None
        return dns.message.from_wire(out)


@pytest.fixture
async def world(pki: Pki) -> World:
    import time

    w = World(pki, Clock(time.time()))
    for ns, cert in pki.certs.items():
        await w.put(Keys.cert(pki.kid(ns)), cert.to_json())
    return w


def name_of(cpid: str) -> str:
    return parse_cpid(cpid).to_dns("cpi.")


async def test_a_served_record_is_answered_with_its_txt(world: World) -> None:
    node = await world.node()
    r = world.ask(name_of(node.cpid))
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA
    (rrset,) = r.answer
    assert rrset.rdtype == dns.rdatatype.TXT
    assert f"cpid={node.cpid}".encode() in b" ".join(rrset[0].strings)
    assert rrset.ttl == MAX_TTL


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode"),
    [
        ("nothing-here.gpu.cmcc.31.cn.cpi.", "TXT", dns.rcode.NXDOMAIN),
        ("example.com.", "A", dns.rcode.REFUSED),
        ("cpi.", "AXFR", dns.rcode.REFUSED),
        ("cpi.", "SOA", dns.rcode.NOERROR),
    ],
)
async def test_rcodes_by_question(world: World, name: str, rdtype: str, rcode: int) -> None:
    assert world.ask(name, rdtype).rcode() == rcode


async def test_nxdomain_carries_the_soa_with_the_negative_ttl(world: World) -> None:
    r = world.ask("nothing-here.gpu.cmcc.31.cn.cpi.")
    (soa,) = r.authority
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa[0].minimum == NEGATIVE_TTL


async def test_not_ready_is_servfail_and_not_cached(world: World) -> None:
    node = await world.node()
    world.view.ready = False
    assert world.ask(name_of(node.cpid)).rcode() == dns.rcode.SERVFAIL
    world.view.ready = True
    assert world.ask(name_of(node.cpid)).rcode() == dns.rcode.NOERROR


async def test_other_opcodes_and_responses(world: World) -> None:
    q = dns.message.make_query("cpi.", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    out = world.answerer.answer(q.to_wire())
    assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.NOTIMP
    response = dns.message.make_response(dns.message.make_query("cpi.", "SOA"))
    assert world.answerer.answer(response.to_wire()) is None  # never answer an answer


async def test_ttl_never_outlives_the_records_validity(world: World) -> None:
    node = await world.node()
    entry = world.state.get(node.cpid)
    assert entry is not None
    world.clock.now = entry.valid_until - 10.5  # 10.5 s left, minus 1 s of slack
    (rrset,) = world.ask(name_of(node.cpid)).answer
    assert rrset.ttl == 9


async def test_a_cached_answer_expires_by_the_monotonic_clock(world: World) -> None:
    node = await world.node()
    entry = world.state.get(node.cpid)
    assert entry is not None
    world.clock.now = entry.valid_until - 10.5
    name = name_of(node.cpid)
    world.ask(name)
    world.ask(name)
    assert world.answerer.stats()["cache_hits"] == 1
    world.clock.mono += 60  # past the answer's expiry: rendered again
    world.clock.now += 5
    (rrset,) = world.ask(name).answer
    assert world.answerer.stats()["cache_hits"] == 1
    assert rrset.ttl == 4


async def test_a_change_drops_the_cached_answer(world: World) -> None:
    node = await world.node()
    name = name_of(node.cpid)
    world.ask(name)
    await world.put(Keys.rec(node.cpid), signed(world.pki, node.record(version=2)).to_json())
    world.ask(name)
    assert world.answerer.stats()["cache_hits"] == 0


# -- open-ended input -----------------------------------------------------------------------


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(wire=st.binary(max_size=600), tcp=st.booleans())
async def test_random_bytes_never_raise(world: World, wire: bytes, tcp: bool) -> None:
    out = world.answerer.answer(wire, tcp)
    assert out is None or isinstance(out, bytes)
    if out is not None and len(wire) >= 2:
        assert out[:2] == wire[:2]  # the answer carries the query's ID


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
async def test_mutated_queries_never_raise(world: World, data: st.DataObject) -> None:
    wire = bytearray(
        dns.message.make_query("x.gpu.cmcc.31.cn.cpi.", "TXT", want_dnssec=True).to_wire()
    )
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    out = world.answerer.answer(bytes(wire[:cut]), data.draw(st.booleans()))
    assert out is None or isinstance(out, bytes)


# -- amplification ------------------------------------------------------------------------


async def big_world(world: World) -> list[Node]:
    """25 GPU nodes with 8 IPv4 and 8 IPv6 endpoints each: large TXT/A/AAAA/SRV/PTR answers."""
    from schemas.models import Endpoint

    nodes = []
    for i in range(25):
        node = Node()
        eps = [Endpoint(proto="https", host=f"10.0.{i}.{j}", port=443, purpose="inference")
               for j in range(8)]  # fmt: skip
        eps += [Endpoint(proto="https", host=f"fd00::{i}:{j}", port=443, purpose="inference")
                for j in range(8)]  # fmt: skip
        await world.put(
            Keys.rec(node.cpid), signed(world.pki, node.record(endpoints=eps)).to_json()
        )
        nodes.append(node)
    return nodes


def amplification_queries(cpid: str) -> list[tuple[str, str]]:
    name = name_of(cpid)
    return [
        (name, "TXT"),
        (name, "ANY"),
        (name, "A"),
        (name, "AAAA"),
        (f"ep0.{name}", "A"),
        (f"_inference._https.{name}", "SRV"),
        ("_gpu._cpi.cpi.", "PTR"),
        ("_gpu._cpi.cpi.", "ANY"),
        ("_h100._gpu._cpi.cpi.", "PTR"),
        ("cpi.", "ANY"),
        ("cpi.", "SOA"),
        ("cpi.", "NS"),
        ("x.cpi.", "A"),
        ("nothing-here.gpu.cmcc.31.cn.cpi.", "TXT"),
    ]


async def test_udp_answers_are_at_most_ten_times_their_query(world: World) -> None:
    nodes = await big_world(world)
    worst = 0.0
    for name, rdtype in amplification_queries(nodes[0].cpid):
        for edns in (-1, 0):
            wire = dns.message.make_query(name, rdtype, use_edns=edns, payload=4096).to_wire()
            out = world.answerer.answer(wire)
            assert out is not None
            worst = max(worst, len(out) / len(wire))
            if len(out) > 10 * len(wire) - 11:  # would not fit: truncated instead
                raise AssertionError(f"{name} {rdtype}: {len(wire)} -> {len(out)} bytes")
            # over TCP the whole answer comes, whatever its size
            full = world.answerer.answer(wire, True)
            assert full is not None and not dns.message.from_wire(full).flags & dns.flags.TC
    assert worst <= 10
    # the big answers did not fit: TC, the question only
    q = dns.message.make_query("_gpu._cpi.cpi.", "PTR", use_edns=0)
    r = dns.message.from_wire(world.answerer.answer(q.to_wire()) or b"")
    assert r.flags & dns.flags.TC and r.answer == [] and r.question == q.question


async def test_any_is_answered_with_one_hinfo_record(world: World) -> None:
    nodes = await big_world(world)
    name = name_of(nodes[0].cpid)
    for tcp in (False, True):
        q = dns.message.make_query(name.upper(), "ANY")
        r = dns.message.from_wire(world.answerer.answer(q.to_wire(), tcp) or b"")
        [rrset] = r.answer
        assert rrset.rdtype == dns.rdatatype.HINFO and len(rrset) == 1
        assert (rrset[0].cpu, rrset[0].os) == (b"RFC8482", b"")
        assert rrset.name == q.question[0].name and rrset.ttl == MAX_TTL
        assert r.additional == [] and r.authority == []
    # a name without records: NODATA; no name: NXDOMAIN (as for other types)
    assert world.ask("31.cn.cpi.", "ANY").answer == []
    assert world.ask("nothing-here.gpu.cmcc.31.cn.cpi.", "ANY").rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("edns", [-1, 0])
@pytest.mark.parametrize("name", ["cpi.", "x.y.cpi.", "example.com.", "."])
def test_a_slipped_answer_is_the_question_with_tc(name: str, edns: int) -> None:
    q = dns.message.make_query(name, "TXT", use_edns=edns)
    q.flags |= dns.flags.CD
    wire = q.to_wire()
    out = truncated(wire)
    assert out is not None and len(out) <= len(wire)
    r = dns.message.from_wire(out)
    assert r.id == q.id and r.flags & dns.flags.QR and r.flags & dns.flags.TC
    assert r.flags & dns.flags.RD and r.rcode() == dns.rcode.NOERROR
    assert r.question == q.question and r.answer == [] and r.additional == []


def test_no_slipped_answer_to_what_is_not_a_query() -> None:
    q = dns.message.make_query("cpi.", "A")
    wire = q.to_wire()
    assert truncated(wire[:14]) is None  # cut short
    assert truncated(dns.message.make_response(q).to_wire()) is None  # a response
    assert truncated(wire[:4] + b"\x00\x02" + wire[6:]) is None  # two questions
    assert truncated(wire[:12] + b"\xc0\x0c" + wire[-4:]) is None  # a pointer


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_slipping_random_bytes_never_raises_nor_grows(wire: bytes) -> None:
    out = truncated(wire)
    assert out is None or len(out) <= len(wire)

"""Resolver test kit: a PKI, nodes, and writes the way a registry does them.

``Pki`` builds a national root ``CN`` and delegations (``CN.31`` with delegate+issue,
``CN.31.CMCC`` and ``CN.3`` and ``CN.32`` with issue).  Records are signed with
:mod:`registry.ca` and written through :class:`registry.index.Index` and
:class:`registry.index.Keys` exactly where a registry writes them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import seeds
from registry import ca
from registry.index import Index, Keys, Op
from resolver.core import Resolver, ResolverSettings
from resolver.discovery import LatencyTable
from resolver.entry import Entry, Sealed
from resolver.replica import SyncSettings
from resolver.state import ReplicaSettings
from resolver.verify import RecordFacts, StatusFacts
from schemas import keys
from schemas.chain import TrustAnchors
from schemas.cpid import derive
from schemas.dsse import Envelope
from schemas.keys import Ed25519PrivateKey
from schemas.models import (
    Accelerator,
    Attributes,
    Capacity,
    CpuInfo,
    Endpoint,
    Location,
    Record,
    Status,
)

LATENCY = seeds.path(seeds.LATENCY)

FAST = ResolverSettings(
    replica=ReplicaSettings(mass_expiry_window_s=5.0, mass_expiry_hold_s=30.0),
    sync=SyncSettings(probe_interval=0.2, probe_timeout=0.5, stale_after=3.0, sweep_interval=0.2),
    event_ring_size=1000,
    verify_workers=0,
)


@dataclass
class Pki:
    """A root and delegated namespaces, each with its key and cert."""

    root: Ed25519PrivateKey = field(default_factory=keys.generate)
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    certs: dict[str, Envelope] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.delegate("CN", "CN.31", ["delegate", "issue"], issuer_key=self.root)
        self.delegate("CN.31", "CN.31.CMCC", ["issue"])
        self.delegate("CN", "CN.3", ["issue"], issuer_key=self.root)
        self.delegate("CN", "CN.32", ["issue"], issuer_key=self.root)

    @property
    def anchor(self) -> Any:
        return ca.make_anchor("CN", self.root)

    @property
    def anchors(self) -> TrustAnchors:
        return TrustAnchors([self.anchor])

    def key_of(self, ns: str) -> Ed25519PrivateKey:
        return self.root if ns == "CN" else self.keys[ns]

    def delegate(
        self,
        issuer: str,
        subject: str,
        scopes: list[str],
        *,
        issuer_key: Ed25519PrivateKey | None = None,
        key: Ed25519PrivateKey | None = None,
        **kwargs: Any,
    ) -> Envelope:
        k = key or keys.generate()
        env = ca.issue_cert(
            issuer_key=issuer_key or self.key_of(issuer),
            issuer_subject=issuer,
            subject=subject,
            public_key=k,
            scopes=scopes,
            **kwargs,
        )
        self.keys[subject] = k
        self.certs[subject] = env
        return env

    def kid(self, ns: str) -> str:
        return keys.kid_of(self.key_of(ns))

    def write_anchor(self, path: Path) -> Path:
        path.write_bytes(self.anchor.to_json())
        return path

    async def publish(self, index: Index, *namespaces: str) -> None:
        """Write certs (``/certs/<kid>``) and ``/ns/`` entries, as ``cpi ns publish`` does."""
        for ns in namespaces or tuple(self.certs):
            kid = self.kid(ns)
            await index.txn(
                success=[
                    Op.put(Keys.cert(kid), self.certs[ns].to_json()),
                    Op.put(
                        Keys.ns(ns),
                        json.dumps({"kid": kid, "endpoints": [f"http://{ns.lower()}.test"]}),
                    ),
                ]
            )


@dataclass
class Node:
    """A compute node: its key and the records a registry would sign for it."""

    namespace: str = "CN.31.CMCC"
    kind: str = "GPU"
    region: str = "31"
    model: str = "H100"
    count: int = 8
    labels: dict[str, str] = field(default_factory=lambda: {"tier": "gold"})
    key: Ed25519PrivateKey = field(default_factory=keys.generate)
    seq: int = 0

    @property
    def cpid(self) -> str:
        return derive(self.namespace, self.kind, keys.public_raw(self.key)).to_text()

    def record(self, **changes: Any) -> Record:
        now = int(time.time())
        fields: dict[str, Any] = {
            "cpid": self.cpid,
            "kind": self.kind,
            "public_key": keys.public_to_b64url(self.key),
            "issuer": self.namespace,
            "version": 1,
            "issued_at": now - 10,
            "expires_at": now + 86_400,
            "endpoints": [
                Endpoint(
                    proto="https",
                    host=f"{self.cpid[-6:].lower()}.test",
                    port=443,
                    purpose="inference",
                )
            ],
            "location": Location(region=self.region, site="S1"),
            "attributes": Attributes(
                cpu=CpuInfo(model="Xeon", cores=64),
                memory_gib=512.0,
                accelerators=[
                    Accelerator(
                        vendor="NVIDIA", model=self.model, memory_gib=80.0, count=self.count
                    )
                ]
                if self.count
                else [],
            ),
            "labels": dict(self.labels),
        }
        fields.update(changes)
        return Record(**fields)

    def status(
        self,
        *,
        free: int = 8,
        state: str = "up",
        cpid: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> Envelope:
        self.seq += 1
        st = Status(
            cpid=cpid or self.cpid,
            seq=self.seq,
            observed_at=int(time.time() * 1000),
            state=state,  # type: ignore[arg-type]
            capacity=Capacity(accelerators_free=free, cpu_free=32),
            metrics={"gpu_util": 0.5} if metrics is None else metrics,
        )
        return ca.sign_document(st, self.key)


def signed(pki: Pki, rec: Record, signer_ns: str | None = None) -> Envelope:
    return ca.sign_document(rec, pki.key_of(signer_ns or rec.issuer))


async def put_record(index: Index, pki: Pki, node: Node, **changes: Any) -> int:
    """Sign the node's record with its namespace key and write it; returns the revision."""
    return await index.put(Keys.rec(node.cpid), signed(pki, node.record(**changes)).to_json())


async def put_status(index: Index, node: Node, *, lease: int = 0, **kw: Any) -> int:
    return await index.put(Keys.live(node.cpid), node.status(**kw).to_json(), lease=lease)


def make_resolver(index: Index, pki: Pki, settings: ResolverSettings = FAST) -> Resolver:
    return Resolver(
        index=index,
        anchors=pki.anchors,
        latency=LatencyTable.from_file(LATENCY),
        settings=settings,
    )


def nonce() -> str:
    return secrets.token_urlsafe(16)


def resolver_config(etcd_endpoint: str, anchor: Path, **changes: Any) -> Any:
    """A resolver config with short timings for tests."""
    from resolver.config import EtcdSettings, ResolverConfig

    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "etcd": EtcdSettings(endpoints=[etcd_endpoint], timeout_s=3.0),
        "anchor_files": [anchor],
        "latency_table": LATENCY,
        "probe_interval_s": 0.2,
        "probe_timeout_s": 0.5,
        "stale_after_s": 3.0,
        "sweep_interval_s": 0.2,
        "verify_workers": 0,
        "event_ring_size": 1000,
        "watch_heartbeat_s": 0.5,
    }
    fields.update(changes)
    return ResolverConfig(**fields)


async def ready_app_client(aiohttp_client: Any, config: Any) -> Any:
    """aiohttp's test client for the resolver app made from ``config``, once ``/readyz``
    says 200."""
    from resolver.http import create_app
    from tests.until import until

    client = await aiohttp_client(create_app(config))

    async def ready() -> bool:
        return bool((await client.get("/readyz")).status == 200)

    await until(ready, what="the resolver to be ready")
    return client


class SSE:
    """A minimal reader of a ``text/event-stream`` response (for asserting on the wire)."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.last_id: str | None = None

    async def next(self, within: float = 10.0, *, skip_progress: bool = True) -> dict[str, Any]:
        """The next event as ``{"event", "id", "data"}`` (progress messages skipped)."""
        async with asyncio.timeout(within):
            while True:
                event, ident, data = "", None, []
                while True:
                    raw = await self.resp.content.readline()
                    if not raw:
                        raise EOFError("event stream ended")
                    line = raw.decode().rstrip("\n")
                    if not line:
                        break
                    if line.startswith(":"):
                        continue
                    name, _, value = line.partition(": ")
                    if name == "event":
                        event = value
                    elif name == "id":
                        ident = value
                    elif name == "data":
                        data.append(value)
                if ident is not None:
                    self.last_id = ident
                if not data:
                    if ident is not None and not skip_progress:
                        return {"event": "progress", "id": ident, "data": {}}
                    continue
                return {"event": event, "id": ident, "data": json.loads("\n".join(data))}


def bare_entry(
    facts: RecordFacts,
    sealed: Sealed,
    *,
    status: StatusFacts | None = None,
    status_sealed: Sealed | None = None,
    claimed: int = 0,
) -> Entry:
    """An entry made directly (no verification): for index and ranking tests."""
    return Entry(
        facts=facts,
        sealed=sealed,
        chain=(),
        record_revision=1,
        status_facts=status,
        status_sealed=status_sealed,
        status_revision=0,
        lease=0,
        live_held=False,
        held_until=0.0,
        claimed=claimed,
        revision=1,
        valid_until=float("inf"),
        leases={},
    )

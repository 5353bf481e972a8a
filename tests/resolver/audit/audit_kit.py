"""Set-up shared by the auditor and log tests: a root, delegations, records, audit entries.

``Kit`` builds a national root ``CN`` (anchor file on disk), delegates ``CN.31``
(delegate, issue) and ``CN.31.CMCC`` (issue), publishes both certs under
``/cpi/v1/certs/`` and their ``/ns/`` entries, and signs records the way a registry
does: each record and its audit entry go into etcd in one transaction
(:class:`registry.changes.AuditStream`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry import ca
from registry.changes import AuditStream
from registry.index import Index, Keys, Op
from schemas import dsse, keys
from schemas.bundle import bundle_dict
from schemas.chain import TrustAnchors
from schemas.cpid import derive
from schemas.keys import Ed25519PrivateKey
from schemas.models import Capacity, Location, Record, Status


@dataclass
class Kit:
    tmp: Path
    now: int = field(default_factory=lambda: int(time.time()))
    root: Ed25519PrivateKey = field(default_factory=keys.generate)
    ns31: Ed25519PrivateKey = field(default_factory=keys.generate)
    cmcc: Ed25519PrivateKey = field(default_factory=keys.generate)

    def __post_init__(self) -> None:
        self.anchor = ca.make_anchor("CN", self.root)
        self.anchor_path = self.tmp / "anchor.json"
        self.anchor_path.write_bytes(self.anchor.to_json())
        self.anchors = TrustAnchors([self.anchor])
        self.cert31 = ca.issue_cert(
            issuer_key=self.root,
            issuer_subject="CN",
            subject="CN.31",
            public_key=self.ns31,
            scopes=["delegate", "issue"],
            now=self.now,
        )
        self.cert_cmcc = ca.issue_cert(
            issuer_key=self.ns31,
            issuer_subject="CN.31",
            subject="CN.31.CMCC",
            public_key=self.cmcc,
            scopes=["issue"],
            now=self.now,
        )
        self.chain = [self.cert_cmcc, self.cert31]

    async def publish(self, index: Index) -> None:
        for env, key, ns in (
            (self.cert31, self.ns31, "CN.31"),
            (self.cert_cmcc, self.cmcc, "CN.31.CMCC"),
        ):
            kid = keys.kid_of(key)
            await index.put(Keys.cert(kid), env.to_json())
            await index.put(Keys.ns(ns), json.dumps({"kid": kid, "endpoints": []}))

    def record(
        self,
        node: Ed25519PrivateKey | None = None,
        *,
        signer: Ed25519PrivateKey | None = None,
        issuer: str = "CN.31.CMCC",
        namespace: str = "CN.31.CMCC",
        cpid: str | None = None,
        version: int = 1,
        issued_at: int | None = None,
        expires_at: int | None = None,
        **fields: Any,
    ) -> tuple[str, dsse.Envelope, Ed25519PrivateKey]:
        """A record signed by ``signer`` (default: CN.31.CMCC's key); returns (cpid, env, node key)."""
        node = node or keys.generate()
        cpid = cpid or derive(namespace, "GPU", keys.public_raw(node)).to_text()
        rec = Record(
            cpid=cpid,
            kind="GPU",
            public_key=keys.public_to_b64url(node),
            issuer=issuer,
            version=version,
            issued_at=self.now - 10 if issued_at is None else issued_at,
            expires_at=self.now + 86_400 if expires_at is None else expires_at,
            location=Location(region="31"),
            **fields,
        )
        return cpid, ca.sign_document(rec, signer or self.cmcc), node

    async def register(
        self, index: Index, cpid: str, env: dsse.Envelope, *, op: str = "register"
    ) -> None:
        """Write a record and its audit entry in one transaction, as the registrar does."""
        result = await AuditStream(index).commit(
            success=[Op.put(Keys.rec(cpid), env.to_json())],
            op=op,  # type: ignore[arg-type]
            envelope=env,
            cpid=cpid,
        )
        assert result.succeeded

    def status(self, cpid: str, node: Ed25519PrivateKey, *, free: int = 4) -> dsse.Envelope:
        st = Status(
            cpid=cpid,
            seq=1,
            observed_at=self.now * 1000,
            state="up",
            capacity=Capacity(accelerators_free=free),
        )
        return ca.sign_document(st, node)

    def bundle(self, env: dsse.Envelope, **extra: Any) -> dict[str, Any]:
        return bundle_dict(env, list(self.chain), **extra)


def resolver_app(index: Index, kit: Kit) -> Any:
    """A stand-in resolver: ``/v1/resources/{cpid}`` from the index, plus the log routes."""
    from aiohttp import web

    from resolver.audit.log import add_log_routes

    async def resource(request: web.Request) -> web.Response:
        cpid = request.match_info["cpid"]
        kv = await index.get(Keys.rec(cpid))
        if kv is None:
            return web.json_response({"error": {"code": "not_found", "message": cpid}}, status=404)
        live = await index.get(Keys.live(cpid))
        status = json.loads(live.value) if live else None
        env = dsse.Envelope.from_json(kv.value)
        return web.json_response(kit.bundle(env, status=status, revision=kv.mod_revision))

    app = web.Application()
    app.router.add_get("/v1/resources/{cpid:.+}", resource)
    add_log_routes(app, index=index, refresh_interval=0.05)
    return app

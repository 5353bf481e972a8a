"""Shared set-up for the registry service tests: a root, delegations, nodes, requests.

``World`` builds a national root ``CN`` (anchor file), delegates ``CN.31`` (delegate,
issue) and ``CN.31.CMCC`` (issue), publishes both certs under ``/cpi/v1/certs/`` and
publishes both namespaces under ``/cpi/v1/ns/`` and writes a registry config serving
both namespaces.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry import ca, keyfile, tokens
from registry.config import RegistryConfig, load_config
from registry.index import Index, Keys
from schemas import dsse, keys
from schemas.cpid import derive
from schemas.keys import Ed25519PrivateKey
from schemas.models import Capacity, Deregister, Location, Register, Status

ROOT = "/cpi/v1/"
ADMIN_TOKEN = "admin-secret-for-tests"


async def dump(index: Index) -> dict[str, bytes]:
    """Every key and value under /cpi/v1/."""
    kvs, _ = await index.get_prefix(ROOT)
    return {kv.key: kv.value for kv in kvs}


def nonce() -> str:
    return secrets.token_urlsafe(16)


@dataclass
class Node:
    """A compute node: its key and the documents it signs."""

    namespace: str = "CN.31.CMCC"
    kind: str = "GPU"
    key: Ed25519PrivateKey = field(default_factory=keys.generate)
    seq: int = 0

    @property
    def public_key(self) -> str:
        return keys.public_to_b64url(self.key)

    @property
    def cpid(self) -> str:
        return derive(self.namespace, self.kind, keys.public_raw(self.key)).to_text()

    def register_doc(self, **changes: Any) -> Register:
        fields: dict[str, Any] = {
            "namespace": self.namespace,
            "kind": self.kind,
            "public_key": self.public_key,
            "nonce": nonce(),
            "timestamp": int(time.time()),
            "location": Location(region="31", site="LG01"),
            "labels": {"tier": "test"},
        }
        fields.update(changes)
        return Register(**fields)

    def register(self, **changes: Any) -> bytes:
        return ca.sign_document(self.register_doc(**changes), self.key).to_json()

    def status(
        self,
        *,
        free: int = 8,
        state: str = "up",
        seq: int | None = None,
        observed_at: int | None = None,
        cpid: str | None = None,
    ) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        doc = Status(
            cpid=cpid or self.cpid,
            seq=seq,
            observed_at=int(time.time() * 1000) if observed_at is None else observed_at,
            state=state,  # type: ignore[arg-type]
            capacity=Capacity(accelerators_free=free),
        )
        return ca.sign_document(doc, self.key).to_json()

    def deregister(
        self, *, timestamp: int | None = None, key: Ed25519PrivateKey | None = None
    ) -> bytes:
        doc = Deregister(
            cpid=self.cpid,
            nonce=nonce(),
            timestamp=int(time.time()) if timestamp is None else timestamp,
        )
        return ca.sign_document(doc, key or self.key).to_json()


def sign_raw(payload: dict[str, Any], doc_type: str, key: Ed25519PrivateKey) -> bytes:
    """Sign arbitrary payload JSON (e.g. with unknown fields) as an envelope."""
    from schemas.models import media_type

    return dsse.sign(media_type(doc_type), json.dumps(payload).encode(), key).to_json()


class World:
    """Keys, certs, an anchor file and a config for a registry of CN.31 and CN.31.CMCC."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.root = keys.generate()
        self.r31 = keys.generate()
        self.cmcc = keys.generate()
        self.anchor = ca.make_anchor("CN", self.root)
        self.anchor_file = tmp / "anchor.json"
        self.anchor_file.write_bytes(self.anchor.to_json())
        keyfile.write_private(tmp / "cn31.key", self.r31, overwrite=True)
        keyfile.write_private(tmp / "cmcc.key", self.cmcc, overwrite=True)
        self.cert31 = ca.issue_cert(
            issuer_key=self.root,
            issuer_subject="CN",
            subject="CN.31",
            public_key=self.r31,
            scopes=["delegate", "issue"],
        )
        self.cert_cmcc = ca.issue_cert(
            issuer_key=self.r31,
            issuer_subject="CN.31",
            subject="CN.31.CMCC",
            public_key=self.cmcc,
            scopes=["issue"],
        )

    async def publish(self, index: Index) -> None:
        await index.put(Keys.cert(keys.kid_of(self.r31)), self.cert31.to_json())
        await index.put(Keys.cert(keys.kid_of(self.cmcc)), self.cert_cmcc.to_json())
        for ns, key in (("CN.31", self.r31), ("CN.31.CMCC", self.cmcc)):
            entry = {"kid": keys.kid_of(key), "endpoints": ["http://registry.test"]}
            await index.put(Keys.ns(ns), json.dumps(entry))

    def config_data(self, endpoint: str, **changes: Any) -> dict[str, Any]:
        import hashlib

        data: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "instance_id": "test-registry",
            "etcd": {"endpoints": [endpoint], "timeout_s": 5},
            "namespaces": [
                {"namespace": "CN.31", "key_file": "cn31.key"},
                {"namespace": "CN.31.CMCC", "key_file": "cmcc.key"},
            ],
            "anchor_file": "anchor.json",
            "heartbeat_s": 10,
            "registrations_per_s": 1000,
            "registration_burst": 1000,
            "admin_token_hash": hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest(),
        }
        data.update(changes)
        return data

    def config(self, endpoint: str, **changes: Any) -> RegistryConfig:
        path = self.tmp / "registry.json"
        path.write_text(json.dumps(self.config_data(endpoint, **changes)))
        return load_config(path, env={})

    async def token(
        self,
        index: Index,
        *,
        namespace: str = "CN.31.CMCC",
        kind: str | None = None,
        uses: int | None = None,
        ttl_s: int = 3600,
        now: int | None = None,
    ) -> str:
        return await tokens.create_token(
            index, namespace=namespace, kind=kind, uses=uses, ttl_s=ttl_s, now=now
        )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}

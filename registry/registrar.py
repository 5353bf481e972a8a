"""What a registry does with registrations, status updates and deregistrations.

No HTTP here: :mod:`registry.service` is the aiohttp front end.  Each method checks
its input in a fixed order, raising the first problem as an error of the
:mod:`schemas.errors` tree, and writes nothing unless every check passed.

Registration (``register.v1``), in order:

1. the envelope parses (400 ``invalid_envelope``);
2. the join token is present and known (401 ``invalid_token``) and not expired
   (403 ``token_expired``);
3. proof of possession: the envelope verifies under the ``public_key`` it carries
   (400 ``bad_signature``), and the payload is a valid ``register.v1``
   (400 ``invalid_payload``, e.g. unknown fields);
4. the token admits the namespace and kind (403 ``token_scope``); these come after
   step 3 because the payload is read only once its signature holds (docs/protocol.md §2–5);
5. ``timestamp`` within ±60 s (400 ``stale_timestamp``);
6. the registry holds the namespace itself (403 ``outside_namespace``), the token is
   for that namespace and not a parent of it (403 ``token_scope``), its key is not
   revoked (403 ``revoked``), and the namespace is published under that key's kid
   (403 ``unpublished_namespace`` / ``outside_namespace``; the ``/ns/`` key's
   ``mod_revision`` is compared in the transaction);
7. an existing record for the derived CPID carries the same key (409 ``conflict``);
8. a new CPID needs a token use left (403 ``token_used_up``);
9. the node key is not revoked (403 ``revoked``, :mod:`registry.revocations`);
10. the nonce is fresh for this key (409 ``replayed_nonce``): checked by the
   transaction's compare, so there is no separate read for it.

A status is accepted only by the registry whose key signed the node's record (403
``outside_namespace``); its ``seq`` is checked against memory and the index
(:mod:`registry.liveness`).

Then the record, the token's use count, the nonce and an audit entry are written in
one etcd transaction whose compares (token ``mod_revision``, nonce absent, record
``mod_revision``, audit head) make concurrent registrations safe.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Literal

from registry import tokens
from registry.changes import AuditOp, AuditStream
from registry.errors import (
    ReplayedNonceError,
    RevokedKeyError,
    StaleTimestampError,
    UnknownTokenError,
    UnpublishedNamespaceError,
)
from registry.index import KV, Cmp, Index, Keys, Lease, Op
from registry.liveness import Liveness, NodeState
from registry.metrics import RegistryMetrics
from registry.national import NsEntry
from registry.revocations import Revocations
from registry.signers import Signer, Signers
from schemas import dsse, keys
from schemas.chain import CLOCK_SKEW, open_self_signed, open_signed
from schemas.cpid import derive, parse
from schemas.dsse import Envelope
from schemas.errors import (
    ConflictError,
    NotFoundError,
    OutsideNamespaceError,
    PayloadError,
)
from schemas.models import Deregister, Document, Record, Register, Status, parse_payload

__all__ = ["NONCE_TTL_S", "Registrar", "Registration"]

_log = logging.getLogger(__name__)

NONCE_TTL_S = 3 * CLOCK_SKEW
"""Lifetime of a used nonce's key.  A request is accepted only while its timestamp is
within ±60 s of the registry's clock, so 120 s of memory suffice; nonces are written
on a lease that is used for 60 s and lives 180 s, so every nonce lives >= 120 s."""
_NONCE_LEASE_USE_S = NONCE_TTL_S - 2 * CLOCK_SKEW
_ATTEMPTS = 5
_TOKEN_CACHE_S = 5.0
_TOKEN_CACHE_SIZE = 4096

Outcome = Literal["created", "updated", "renewed", "unchanged"]
_AUDIT_OP: dict[str, AuditOp] = {"created": "register", "updated": "update", "renewed": "renew"}


@dataclass(frozen=True, slots=True)
class Registration:
    """The result of an accepted registration."""

    outcome: Outcome
    cpid: str
    record: Envelope
    chain: tuple[Envelope, ...]
    record_json: bytes = b""
    """``record.to_json()`` (what is stored in etcd), when known: the answer reuses it."""

    @property
    def created(self) -> bool:
        return self.outcome == "created"


def _record_of(kv: KV) -> tuple[Envelope, Record]:
    env = Envelope.from_json(kv.value)
    return env, parse_payload(env.payload_type, env.payload, Record)


class _NonceLease:
    """A shared lease for nonce keys, replaced every minute (one grant, not one per nonce)."""

    def __init__(self, index: Index, metrics: RegistryMetrics) -> None:
        self._index = index
        self._metrics = metrics
        self._lease: Lease | None = None
        self._granted = 0.0

    async def id(self) -> int:
        now = time.monotonic()
        if self._lease is None or now - self._granted >= _NONCE_LEASE_USE_S:
            async with self._metrics.etcd("lease-grant"):
                self._lease = await self._index.grant_lease(NONCE_TTL_S, revoke_on_exit=False)
            self._granted = now
        return self._lease.id


def _ns_entry(value: bytes) -> NsEntry:
    """A ``/ns/`` value parsed (cached when small: the same few values come with every
    request; a refusal is an exception, not cached)."""
    if len(value) > 4096:
        return NsEntry.from_json(value)
    return _ns_entry_cached(value)


@functools.lru_cache(maxsize=256)
def _ns_entry_cached(value: bytes) -> NsEntry:
    return NsEntry.from_json(value)


def _check_time(what: str, value: int, now: int) -> None:
    skew = value - now
    if abs(skew) > CLOCK_SKEW:
        raise StaleTimestampError(
            f"{what} {value} is {skew:+d} s from the registry's clock ({now}); "
            f"at most ±{CLOCK_SKEW} s allowed (check the node's clock)"
        )


class Registrar:
    """Registration, status and deregistration against the index."""

    def __init__(
        self,
        *,
        index: Index,
        signers: Signers,
        liveness: Liveness,
        audit: AuditStream,
        metrics: RegistryMetrics,
        record_ttl_s: int,
        max_body_bytes: int,
        revocations: Revocations | None = None,
    ) -> None:
        self._index = index
        self.signers = signers
        self.liveness = liveness
        self._audit = audit
        self.metrics = metrics
        self.record_ttl_s = record_ttl_s
        self.max_body_bytes = max_body_bytes
        self._nonces = _NonceLease(index, metrics)
        self._tokens: dict[str, tuple[tokens.Token, float]] = {}
        self._ns: dict[str, tuple[KV | None, float]] = {}
        self.revocations = revocations

    # -- helpers ------------------------------------------------------------------------

    def _envelope(self, body: bytes, expected: type[Document]) -> Envelope:
        env = Envelope.from_json(body, max_bytes=self.max_body_bytes)
        if env.payload_type != expected.media_type():
            raise PayloadError(
                f"payloadType is {env.payload_type!r}, expected {expected.media_type()!r}"
            )
        return env

    def _signer_for(self, namespace: str, what: str) -> Signer:
        signer = self.signers.pick(namespace)
        if signer is None:
            raise OutsideNamespaceError(
                f"{what} {namespace} is outside this registry's certified namespaces "
                f"({', '.join(self.signers.namespaces)}); register with the registry of "
                f"{namespace} (its URL is under /cpi/v1/ns/)"
            )
        return signer

    def _check_signer(self, signer: Signer) -> None:
        """Refuse to sign (or vouch) with a key whose cert, or a cert above it, is revoked."""
        reason = self.revocations.signer_revoked(signer) if self.revocations else None
        if reason is not None:
            raise RevokedKeyError(
                f"this registry's key for namespace {signer.namespace} (kid {signer.kid}) is "
                f"revoked ({reason}); it can no longer sign records of {signer.namespace}"
            )

    def _check_node_key(
        self, record: Envelope, public_key: str, *, node_kid: str | None = None
    ) -> None:
        """Refuse anything from a node whose record key is revoked.  ``node_kid``: the
        kid of ``public_key`` when the caller has it (no revocation names it: done)."""
        if self.revocations is None:
            return
        if node_kid is not None and node_kid not in self.revocations.envelopes:
            return  # what record_key_revoked() finds first, without decoding the key again
        reason = self.revocations.record_key_revoked(record, public_key)
        if reason is not None:
            node_kid = keys.kid(keys.b64url_decode(public_key))
            raise RevokedKeyError(f"the node key {node_kid} is revoked ({reason})")

    async def _namespace(self, namespace: str, *, fresh: bool = False) -> KV | None:
        """The ``/ns/`` entry of ``namespace``, from a short-lived cache unless ``fresh``;
        the registration's transaction compares its ``mod_revision``."""
        hit = self._ns.get(namespace)
        now = time.monotonic()
        if hit is not None and not fresh and now - hit[1] < _TOKEN_CACHE_S:
            return hit[0]
        kv = await self._get(Keys.ns(namespace), "get-ns")
        if len(self._ns) >= _TOKEN_CACHE_SIZE:
            self._ns.clear()
        self._ns[namespace] = (kv, now)
        return kv

    def _check_published(self, namespace: str, kv: KV | None, signer: Signer) -> None:
        """A namespace gets records only once published, and only from its own key."""
        if kv is None:
            raise UnpublishedNamespaceError(
                f"namespace {namespace} is not published (no {Keys.ns(namespace)}); "
                "a namespace gets records only after its delegation is published "
                "(cpi ns publish)"
            )
        try:
            entry = _ns_entry(kv.value)
        except PayloadError as exc:
            raise UnpublishedNamespaceError(
                f"namespace {namespace}: {Keys.ns(namespace)} is unreadable ({exc})"
            ) from exc
        if entry.kid != signer.kid:
            where = ", ".join(entry.endpoints) or f"the registry listed at {Keys.ns(namespace)}"
            raise OutsideNamespaceError(
                f"namespace {namespace} is held by key {entry.kid}, not by this registry's "
                f"key {signer.kid}; register with the registry of {namespace} ({where})"
            )

    async def _get(self, key: str, op: str) -> KV | None:
        async with self.metrics.etcd(op):
            return await self._index.get(key)

    async def _token(self, text: str | None, *, fresh: bool = False) -> tokens.Token:
        """The presented token, from a short-lived cache unless ``fresh``.

        A stale cache entry cannot let anything through: the registration's transaction
        compares the token's ``mod_revision``, and a failed compare reads it afresh.
        """
        sha = tokens.hash_token(text) if text else ""
        hit = self._tokens.get(sha)
        now = time.monotonic()
        if hit is not None and not fresh and now - hit[1] < _TOKEN_CACHE_S:
            return hit[0]
        async with self.metrics.etcd("get-token"):
            token = await tokens.lookup(self._index, text)
        if len(self._tokens) >= _TOKEN_CACHE_SIZE:
            self._tokens.clear()
        self._tokens[sha] = (token, now)
        return token

    async def authenticate(self, text: str) -> tokens.Token:
        """The join token ``text`` if it is known and still valid, else a
        :class:`~registry.errors.TokenError` (used to pick the rate-limit bucket)."""
        token = await self._token(text)
        token.check_valid(now=int(time.time()))
        return token

    async def _nonce_used(self, kid: str, nonce: str) -> None:
        if await self._get(Keys.nonce(kid, nonce), "get-nonce") is not None:
            raise ReplayedNonceError(
                f"nonce {nonce!r} was already used by key {kid}; sign a new request "
                "with a fresh nonce"
            )

    def _sign_record(
        self, reg: Register, cpid: str, signer: Signer, version: int, now: int
    ) -> Envelope:
        record = Record(
            cpid=cpid,
            kind=reg.kind,
            public_key=reg.public_key,
            issuer=signer.namespace,
            version=version,
            issued_at=now,
            expires_at=min(now + self.record_ttl_s, signer.cert.not_after),
            endpoints=reg.endpoints,
            location=reg.location,
            attributes=reg.attributes,
            labels=reg.labels,
        )
        # the signer's kid is known: not derived from the private key on every record
        return dsse.sign(record.media_type(), record.to_json(), signer.key, keyid=signer.kid)

    def _renew_due(self, env: Envelope, rec: Record, signer: Signer, now: int) -> bool:
        return (
            env.keyid != signer.kid
            or rec.issuer != signer.namespace
            or rec.expires_at - now < self.record_ttl_s // 2
        )

    # -- registration ---------------------------------------------------------------------

    async def register(self, body: bytes, token_text: str | None) -> Registration:
        """Check and apply a ``register.v1`` envelope (see the module docstring)."""
        env = self._envelope(body, Register)
        token = await self._token(token_text)
        now = int(time.time())
        token.check_valid(now=now)
        reg = open_self_signed(env, expected=Register)
        token.check_scope(namespace=reg.namespace, kind=reg.kind)
        _check_time("timestamp", reg.timestamp, now)
        signer = self._signer_for(reg.namespace, "namespace")
        token.check_delegated(namespace=reg.namespace)
        self._check_signer(signer)
        ns_kv = await self._namespace(reg.namespace)
        try:
            self._check_published(reg.namespace, ns_kv, signer)
        except (UnpublishedNamespaceError, OutsideNamespaceError):
            # refuse on a fresh read only, not on a cached one
            ns_kv = await self._namespace(reg.namespace, fresh=True)
            self._check_published(reg.namespace, ns_kv, signer)
        raw = keys.b64url_decode(reg.public_key)
        node_kid = keys.kid(raw)
        cpid = derive(reg.namespace, reg.kind, raw).to_text()
        # the nonce is checked by the transaction's compare (a replay fails it: 409)
        nonce_key = Keys.nonce(node_kid, reg.nonce)
        rec_key = Keys.rec(cpid)

        # a new CPID is the common case: the first attempt assumes no record and lets
        # the transaction's compare (record absent) check it, saving a read; a failed
        # compare returns the record, and the next attempt decides with it.  A token
        # without uses left can only re-register, so then the record is read first.
        rec_kv: KV | None = None
        read = token.info.uses_left == 0
        for _ in range(_ATTEMPTS):
            if read:
                rec_kv = await self._get(rec_key, "get-rec")
            read = False
            outcome: Outcome
            if rec_kv is None:
                outcome, version, old_env = "created", 1, None
            else:
                old_env, old = _record_of(rec_kv)
                if old.public_key != reg.public_key:
                    raise ConflictError(
                        f"serial collision: {cpid} is registered to another key "
                        f"(kid {keys.kid(keys.b64url_decode(old.public_key))}), "
                        f"this request is signed by kid {node_kid}"
                    )
                same = (
                    old.endpoints == reg.endpoints
                    and old.location == reg.location
                    and old.attributes == reg.attributes
                    and old.labels == reg.labels
                )
                if not same:
                    outcome, version = "updated", old.version + 1
                elif self._renew_due(old_env, old, signer, now):
                    outcome, version = "renewed", old.version
                else:
                    outcome, version = "unchanged", old.version
            if outcome == "created":
                token.check_uses()
            t_cmps, t_ops = tokens.consume_ops(token, consume=outcome == "created")
            ns_key = Keys.ns(reg.namespace)
            compare = [
                *t_cmps,
                Cmp.absent(nonce_key),
                Cmp.mod_revision(rec_key, "==", rec_kv.mod_revision if rec_kv else 0),
                Cmp.mod_revision(ns_key, "==", ns_kv.mod_revision if ns_kv else 0),
            ]
            failure = [Op.get(nonce_key), Op.get(token.key), Op.get(ns_key), Op.get(rec_key)]
            if outcome == "unchanged":
                assert old_env is not None
                record_env = old_env
                record_json = b""
            else:
                record_env = self._sign_record(reg, cpid, signer, version, now)
            if old_env is not None:
                self._check_node_key(old_env, reg.public_key, node_kid=node_kid)
            self._check_node_key(record_env, reg.public_key, node_kid=node_kid)
            nonce_op = Op.put(nonce_key, str(reg.timestamp), lease=await self._nonces.id())
            if outcome == "unchanged":
                async with self.metrics.etcd("txn-register"):
                    result = await self._index.txn(
                        compare=compare, success=[*t_ops, nonce_op], failure=failure
                    )
            else:
                record_json = record_env.to_json()  # serialised once: value and digest
                async with self.metrics.etcd("txn-register"):
                    result = await self._audit.commit(
                        compare=compare,
                        success=[Op.put(rec_key, record_json), *t_ops, nonce_op],
                        failure=failure,
                        op=_AUDIT_OP[outcome],
                        envelope=record_env,
                        envelope_json=record_json,
                        cpid=cpid,
                        version=version,
                    )
            if result.succeeded:
                break
            nonce_kvs, token_kvs = result.responses[0].kvs, result.responses[1].kvs
            if nonce_kvs:
                raise ReplayedNonceError(
                    f"nonce {reg.nonce!r} was already used by key {node_kid} within the replay "
                    "window; sign a new request with a fresh nonce"
                )
            if not token_kvs:
                self._tokens.pop(token.sha256, None)
                raise UnknownTokenError("unknown join token (it has been deleted)")
            if token_kvs[0].mod_revision != token.kv.mod_revision:
                token = await self._token(token_text, fresh=True)
                token.check_valid(now=now)
            ns_kvs = result.responses[2].kvs
            if (ns_kvs[0].mod_revision if ns_kvs else 0) != (ns_kv.mod_revision if ns_kv else 0):
                ns_kv = await self._namespace(reg.namespace, fresh=True)
                self._check_published(reg.namespace, ns_kv, signer)
            # the record as the failed transaction saw it: decide again with it
            rec_kvs = result.responses[3].kvs
            rec_kv = rec_kvs[0] if rec_kvs else None
        else:
            raise ConflictError(f"registration of {cpid} kept racing with concurrent writes; retry")
        self.liveness.track(
            cpid, group=signer.namespace, public_key=reg.public_key, signer_kid=record_env.keyid
        )
        self.metrics.registrations.labels(outcome).inc()
        if outcome != "unchanged":
            # DEBUG: the INFO line of every registration is the service's answer line
            # (route, status, outcome, cpid); the audit entry written with the record is
            # the durable trail.  One INFO line per registration, not two (~50 us each).
            _log.debug("%s %s (version %d, issuer %s)", outcome, cpid, version, signer.namespace)
        by_kid = self.signers.by_kid(record_env.keyid)
        chain = by_kid.chain if by_kid is not None else signer.chain
        return Registration(outcome, cpid, record_env, chain, record_json)

    # -- status ---------------------------------------------------------------------------

    async def _node(self, cpid: str) -> NodeState:
        node = self.liveness.get(cpid)
        if node is not None:
            return node
        kv = await self._get(Keys.rec(cpid), "get-rec")
        if kv is None:
            raise NotFoundError(f"no record for {cpid}: register (again) before sending status")
        env, rec = _record_of(kv)
        return self.liveness.track(
            cpid, group=rec.issuer, public_key=rec.public_key, signer_kid=env.keyid
        )

    async def status(self, cpid_text: str, body: bytes) -> bool:
        """Check and apply a ``status.v1`` envelope; return whether etcd was written."""
        parsed = parse(cpid_text)
        cpid = parsed.to_text()
        self._signer_for(parsed.prefix, "CPID namespace")
        env = self._envelope(body, Status)
        node = await self._node(cpid)
        signer = self.signers.by_kid(node.signer_kid)
        if signer is None:
            raise OutsideNamespaceError(
                f"the record of {cpid} is signed by key {node.signer_kid}, which is not this "
                f"registry's: send its status to the registry of {parsed.prefix} that signed "
                f"it (its URL is under {Keys.ns(parsed.prefix)})"
            )
        self._check_signer(signer)
        node_kid, node_key = node.verify_key()
        if self.revocations is not None and node_kid in self.revocations.envelopes:
            # rare: a revocation names this node's key; verify it against the record
            rec_kv = await self._get(Keys.rec(cpid), "get-rec")
            if rec_kv is not None:
                self._check_node_key(_record_of(rec_kv)[0], node.public_key)
        verified = dsse.verify(env, {node_kid: node_key}, payload_types=(Status.media_type(),))
        st = parse_payload(verified.payload_type, verified.payload, Status)
        if st.cpid != cpid:
            raise PayloadError(f"status is for {st.cpid} but was sent to the URL of {cpid}")
        now_ms = int(time.time() * 1000)
        skew_s = (st.observed_at - now_ms) / 1000
        if abs(skew_s) > CLOCK_SKEW:
            raise StaleTimestampError(
                f"observed_at {st.observed_at} ms is {skew_s:+.1f} s from the registry's clock "
                f"({now_ms} ms); at most ±{CLOCK_SKEW} s allowed (check the node's clock)"
            )
        self.metrics.heartbeat_lag.observe(max(0, now_ms - st.observed_at) / 1000)
        return await self.liveness.heartbeat(node, st, env)

    # -- deregistration -------------------------------------------------------------------

    async def deregister(self, cpid_text: str, body: bytes) -> None:
        """Check and apply a ``deregister.v1`` envelope: delete the record and live key."""
        parsed = parse(cpid_text)
        cpid = parsed.to_text()
        self._signer_for(parsed.prefix, "CPID namespace")
        env = self._envelope(body, Deregister)
        rec_key = Keys.rec(cpid)
        for _ in range(_ATTEMPTS):
            kv = await self._get(rec_key, "get-rec")
            if kv is None:
                raise NotFoundError(f"no record for {cpid}")
            rec_env, rec = _record_of(kv)
            d = open_signed(env, public_key=rec.public_key, expected=Deregister)
            self._check_node_key(rec_env, rec.public_key)
            if d.cpid != cpid:
                raise PayloadError(
                    f"deregistration is for {d.cpid} but was sent to the URL of {cpid}"
                )
            _check_time("timestamp", d.timestamp, int(time.time()))
            node_kid = keys.kid(keys.b64url_decode(rec.public_key))
            await self._nonce_used(node_kid, d.nonce)
            nonce_key = Keys.nonce(node_kid, d.nonce)
            async with self.metrics.etcd("txn-deregister"):
                result = await self._audit.commit(
                    compare=[
                        Cmp.mod_revision(rec_key, "==", kv.mod_revision),
                        Cmp.absent(nonce_key),
                    ],
                    success=[
                        Op.delete(rec_key),
                        Op.delete(Keys.live(cpid)),
                        Op.delete(Keys.seq(cpid)),
                        Op.put(nonce_key, str(d.timestamp), lease=await self._nonces.id()),
                    ],
                    failure=[Op.get(nonce_key)],
                    op="deregister",
                    envelope=env,
                    cpid=cpid,
                )
            if result.succeeded:
                self.liveness.forget(cpid)
                self.metrics.deregistrations.inc()
                _log.info("deregistered %s", cpid)
                return
            if result.responses[0].kvs:
                raise ReplayedNonceError(
                    f"nonce {d.nonce!r} was just used by key {node_kid} in a concurrent request"
                )
        raise ConflictError(f"deregistration of {cpid} kept racing with concurrent writes; retry")

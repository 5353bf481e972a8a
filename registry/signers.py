"""The registry's signing keys and the certificates that let it use them.

At start-up each configured namespace's key is loaded, its certificate is looked up
in the index at ``/cpi/v1/certs/<kid of the key>``, and the chain up to an anchor is
assembled from ``/cpi/v1/certs/`` and verified (all of rules 2-4, including
revocations published under ``/cpi/v1/revoked/``).  The registry refuses to start,
saying why, when a cert is missing, is for another subject, lacks scope ``issue``, or
does not verify against the anchor.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from registry import keyfile
from registry.config import NamespaceKey
from registry.errors import StartupError
from registry.index import Index, Keys
from schemas import keys
from schemas.bundle import assemble_chain
from schemas.chain import MAX_DEPTH, TrustAnchors, verify_chain
from schemas.dsse import Envelope
from schemas.errors import InvalidDataError
from schemas.keys import Ed25519PrivateKey
from schemas.models import Cert, parse_payload

__all__ = ["Signer", "Signers", "load_signers"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Signer:
    """One namespace this registry issues records in: its key, cert and chain."""

    namespace: str
    key: Ed25519PrivateKey
    kid: str
    cert: Cert
    chain: tuple[Envelope, ...]
    """The signer's own cert first, up to the one an anchor signed."""


class Signers:
    """The registry's signers; picks the most specific one for a namespace."""

    def __init__(self, signers: Sequence[Signer]) -> None:
        if not signers:
            raise ValueError("a registry needs at least one namespace")
        self._all = tuple(sorted(signers, key=lambda s: -len(s.namespace.split("."))))

    def __iter__(self) -> Iterator[Signer]:
        return iter(self._all)

    @property
    def namespaces(self) -> list[str]:
        return sorted(s.namespace for s in self._all)

    def pick(self, namespace: str) -> Signer | None:
        """The signer of ``namespace`` itself: a record is signed by its own namespace's
        key, never a parent's (docs/verification.md, chain rule 1)."""
        for s in self._all:
            if s.namespace == namespace:
                return s
        return None

    def by_kid(self, kid: str) -> Signer | None:
        return next((s for s in self._all if s.kid == kid), None)


async def _cert_chain(index: Index, kid: str, anchors: TrustAnchors) -> list[Envelope]:
    """Fetch the certs from ``kid``'s up to an anchor and assemble them (leaf first)."""
    found: dict[str, Envelope] = {}
    cursor = kid
    for _ in range(MAX_DEPTH + 1):
        if anchors.get(cursor) is not None or cursor in found:
            break
        kv = await index.get(Keys.cert(cursor))
        if kv is None:
            break
        try:
            env = Envelope.from_json(kv.value)
        except InvalidDataError as exc:
            raise StartupError(f"{Keys.cert(cursor)} holds no valid envelope: {exc}") from exc
        found[cursor] = env
        cursor = env.keyid
    anchor_kids = [a.kid for a in anchors]
    return assemble_chain(kid, found, anchor_kids=anchor_kids)


async def _revocations(index: Index, certs: Sequence[Cert]) -> dict[str, Envelope]:
    out: dict[str, Envelope] = {}
    for cert in certs:
        for ident in (cert.serial, keys.kid(keys.b64url_decode(cert.public_key))):
            kv = await index.get(Keys.revoked(ident))
            if kv is not None:
                try:
                    out[ident] = Envelope.from_json(kv.value)
                except InvalidDataError:
                    _log.warning("ignoring malformed revocation at %s", Keys.revoked(ident))
    return out


async def load_signers(
    index: Index,
    namespaces: Sequence[NamespaceKey],
    anchors: TrustAnchors,
    *,
    now: int | None = None,
) -> Signers:
    """Load every namespace key and check its certificate chain; raise :class:`StartupError`."""
    out: list[Signer] = []
    for entry in namespaces:
        ns = entry.namespace
        key = keyfile.load_private(entry.key_file)
        kid = keys.kid_of(key)
        where = Keys.cert(kid)
        kv = await index.get(where)
        if kv is None:
            raise StartupError(
                f"namespace {ns}: no certificate for its key (kid {kid}) at {where}; "
                f"have the issuer delegate {ns} to this key (cpi ca delegate) and publish "
                "the cert (cpi ns publish)"
            )
        chain = await _cert_chain(index, kid, anchors)
        try:
            leaf = parse_payload(chain[0].payload_type, chain[0].payload, Cert)
        except InvalidDataError as exc:
            raise StartupError(f"namespace {ns}: the cert at {where} is invalid: {exc}") from exc
        if leaf.public_key != keys.public_to_b64url(key):
            raise StartupError(
                f"namespace {ns}: the cert at {where} certifies another key "
                f"({leaf.public_key}), expected this registry's ({keys.public_to_b64url(key)})"
            )
        if leaf.subject != ns:
            raise StartupError(
                f"namespace {ns}: the cert for key {kid} has subject {leaf.subject}, expected {ns}"
            )
        if "issue" not in leaf.scopes:
            raise StartupError(
                f"namespace {ns}: the cert for key {kid} has scopes {sorted(leaf.scopes)}, "
                "but a registry needs scope 'issue' to sign records"
            )
        result = verify_chain(chain, anchors=anchors, revocations={}, now=now)
        if result.ok:
            result = verify_chain(
                chain,
                anchors=anchors,
                revocations=await _revocations(index, result.certs),
                now=now,
            )
        if not result.ok:
            raise StartupError(
                f"namespace {ns}: the certificate chain of key {kid} "
                f"({len(chain)} certs) does not verify against the anchor "
                f"({', '.join(anchors.subjects)}): {result.reason}"
            )
        out.append(Signer(ns, key, kid, leaf, tuple(chain)))
        _log.info(
            "namespace %s: key %s, cert %s valid until %d, chain of %d",
            ns,
            kid,
            leaf.serial,
            leaf.not_after,
            len(chain),
        )
    return Signers(out)

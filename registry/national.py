"""National node tools: the root, delegation certs, revocations and ``/ns/`` entries.

Signing itself lives in :mod:`registry.ca`; this module adds what an operator of the
national node needs around it: the root's files on disk, the checks made before a
cert is issued or a revocation published, and the index writes (through
:mod:`registry.index` only).

Files of a root directory::

    <dir>/root.key      the root's Ed25519 key (PKCS#8 PEM, 0600)
    <dir>/anchor.json   its anchor.v1 (plain JSON, give it to every verifier)

Files :func:`bootstrap_tree` keeps under its data directory::

    <data_dir>/keys/<NS>.key     one key per namespace of the seeded tree (0600)
    <data_dir>/certs/<NS>.json   the cert.v1 envelope certifying that key

Index writes:

* ``/cpi/v1/certs/<kid>`` holds the cert of key ``kid``; it is permanent and never
  replaced by a different cert for the same kid.
* ``/cpi/v1/ns/<NS>`` is ``{"kid", "endpoints"}``: the namespace's current key and the
  URLs of its registries.  Written together with the cert, in one transaction, and
  only after the cert's chain has verified up to a trust anchor.
* ``/cpi/v1/revoked/<serial-or-kid>`` holds a revocation; created once, never replaced,
  with its ``revoke`` entry in the audit stream (:mod:`registry.changes`) in the same
  transaction.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from registry import ca, keyfile
from registry.changes import AuditStream
from registry.index import Cmp, Index, Keys, Op, Prefix, parse_key
from schemas import _json, chain, dsse, keys
from schemas.cpid import ns_contains, parse_namespace
from schemas.errors import (
    ChainError,
    ConflictError,
    EnvelopeError,
    InvalidDataError,
    KeyFileError,
    NotFoundError,
    OutsideNamespaceError,
    PayloadError,
)
from schemas.keys import Ed25519PrivateKey, Ed25519PublicKey
from schemas.models import Anchor, Cert, Revocation, parse_payload
from schemas.usage import UsageSigner, sign_usage_signer

__all__ = [
    "ANCHOR_FILE",
    "DEFAULT_TREE_DAYS",
    "ROOT_KEY_FILE",
    "SCOPES",
    "NsEntry",
    "PublishResult",
    "SeedNode",
    "bootstrap_tree",
    "delegate",
    "fetch_chain",
    "fetch_revocations",
    "get_cert",
    "init_root",
    "load_anchors",
    "load_seeds",
    "publish_ns",
    "publish_usage_signer",
    "read_cert",
    "read_ns",
    "revoke",
]

_log = logging.getLogger(__name__)

ROOT_KEY_FILE: Final = "root.key"
ANCHOR_FILE: Final = "anchor.json"
SCOPES: Final = ("delegate", "issue")
DEFAULT_TREE_DAYS: Final = 5 * 365
"""Validity of the certs :func:`bootstrap_tree` issues (renewal means a new key)."""

_PUBLISH_ATTEMPTS: Final = 3


# =============================================================================
# Files
# =============================================================================


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (written to a temp file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_anchors(path: str | os.PathLike[str]) -> chain.TrustAnchors:
    """Read an anchor file (one ``anchor.v1`` or a list of them)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read anchor file: {exc.strerror}") from exc
    try:
        return chain.TrustAnchors.from_json(data)
    except KeyFileError as exc:
        raise KeyFileError(f"{p}: {exc}") from exc


def read_cert(path: str | os.PathLike[str]) -> dsse.Envelope:
    """Read a ``cert.v1`` envelope from a JSON file (signature not checked here)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise EnvelopeError(f"{p}: cannot read cert file: {exc.strerror}") from exc
    try:
        env = dsse.Envelope.from_json(data)
    except EnvelopeError as exc:
        raise EnvelopeError(f"{p}: {exc}") from exc
    _cert_payload(env, source=str(p))
    return env


def _cert_payload(env: dsse.Envelope, *, source: str = "cert") -> Cert:
    """The cert inside ``env``, parsed but NOT verified (for checks before signing)."""
    try:
        return parse_payload(env.payload_type, env.payload, Cert)
    except PayloadError as exc:
        raise PayloadError(f"{source}: not a cert.v1 envelope: {exc}") from exc


def init_root(
    directory: str | os.PathLike[str], subject: str = "CN", *, exclusive: bool = False
) -> tuple[Ed25519PrivateKey, Anchor]:
    """Create (or reuse) the national root key and its anchor file in ``directory``.

    Idempotent: an existing ``root.key`` is loaded and an existing ``anchor.json`` is
    kept when it names the same subject and key.  With ``exclusive=True`` (what
    ``cpi ca init`` does) any existing root file is an error instead.

    Raises:
        ConflictError: a root file exists and ``exclusive`` is set, or the existing
            anchor names another subject or key, or an anchor exists without its key.
    """
    d = Path(directory)
    root = parse_namespace(subject)
    if "." in root:
        raise OutsideNamespaceError(
            f"root subject {root!r} has {root.count('.') + 1} segments, expected a bare "
            "country code such as 'CN'"
        )
    key_path, anchor_path = d / ROOT_KEY_FILE, d / ANCHOR_FILE
    if exclusive:
        for p in (key_path, anchor_path):
            if p.exists():
                raise ConflictError(
                    f"{p} already exists; refusing to overwrite an existing root "
                    "(choose another --out, or remove the old root deliberately)"
                )
    if anchor_path.exists() and not key_path.exists():
        raise ConflictError(
            f"{anchor_path} exists but {key_path} does not; refusing to create a new root "
            "key that would not match the published anchor"
        )
    key, created = keyfile.load_or_create(key_path)
    anchor = ca.make_anchor(root, key)
    if anchor_path.exists():
        try:
            existing = Anchor.model_validate_json(anchor_path.read_bytes())
        except ValueError as exc:
            raise KeyFileError(f"{anchor_path}: not an anchor.v1 file: {exc}") from exc
        if existing != anchor:
            raise ConflictError(
                f"{anchor_path} names subject {existing.subject!r} with key {existing.kid}, "
                f"expected subject {anchor.subject!r} with key {anchor.kid} (from {key_path})"
            )
    else:
        _write_atomic(anchor_path, anchor.to_json() + b"\n")
    _log.info("%s root %s (kid %s) in %s", "created" if created else "reusing", root, anchor.kid, d)
    return key, anchor


# =============================================================================
# Delegation
# =============================================================================


def _check_scopes(scopes: Iterable[str]) -> list[str]:
    out = sorted({s.strip() for s in scopes if s.strip()})
    unknown = [s for s in out if s not in SCOPES]
    if unknown or not out:
        raise InvalidDataError(
            f"scopes {out or '(none)'} are not valid: expected one or both of delegate, issue"
        )
    return out


def delegate(
    *,
    issuer_key: Ed25519PrivateKey,
    issuer: str,
    subject: str,
    public_key: Ed25519PublicKey | Ed25519PrivateKey,
    scopes: Iterable[str],
    days: float = 365,
    issuer_cert: dsse.Envelope | None = None,
    now: int | None = None,
) -> dsse.Envelope:
    """Issue a ``cert.v1`` delegating ``subject`` to ``public_key``, signed by ``issuer``.

    Works the same from the root (``CN`` -> ``CN.31``) and from a delegated namespace
    (``CN.31`` -> ``CN.31.CMCC`` with CN.31's key).  ``issuer_cert``, the issuer's own
    cert when it is known, must certify ``issuer_key`` for ``issuer``, hold scope
    ``delegate`` and be inside its validity window.

    Raises:
        OutsideNamespaceError: ``subject`` is not at or below ``issuer``.
        InvalidDataError: bad scopes or days, or the issuer's cert does not allow it.
    """
    issuer_ns = parse_namespace(issuer)
    subject_ns = parse_namespace(subject)
    wanted = _check_scopes(scopes)
    if not days > 0:
        raise InvalidDataError(f"validity must be a positive number of days, got {days}")
    if not ns_contains(issuer_ns, subject_ns):
        raise OutsideNamespaceError(
            f"subject {subject_ns!r} is outside issuer {issuer_ns!r}: an issuer can only "
            f"delegate names at or below its own (e.g. {issuer_ns}.X)"
        )
    t = int(time.time()) if now is None else now
    if issuer_cert is not None:
        own = _cert_payload(issuer_cert, source="issuer cert")
        own_key = keys.public_to_b64url(issuer_key)
        if own.public_key != own_key:
            raise InvalidDataError(
                f"issuer cert certifies key {keys.kid(keys.b64url_decode(own.public_key))}, "
                f"but the issuer key is {keys.kid_of(issuer_key)}"
            )
        if own.subject != issuer_ns:
            raise InvalidDataError(
                f"issuer cert is for subject {own.subject!r}, but the issuer is {issuer_ns!r}"
            )
        if "delegate" not in own.scopes:
            raise InvalidDataError(
                f"issuer {issuer_ns!r} may not delegate: its cert (serial {own.serial}) has "
                f"scopes {own.scopes}, 'delegate' is required"
            )
        if not own.not_before - chain.CLOCK_SKEW <= t <= own.not_after + chain.CLOCK_SKEW:
            raise InvalidDataError(
                f"issuer cert (serial {own.serial}) is valid from {own.not_before} to "
                f"{own.not_after}, now is {t}"
            )
        if t + days * ca.DAY > own.not_after:
            _log.warning(
                "cert for %s outlives its issuer's cert (issuer's ends at %d); it stops "
                "verifying when the issuer's does",
                subject_ns,
                own.not_after,
            )
    return ca.issue_cert(
        issuer_key=issuer_key,
        issuer_subject=issuer_ns,
        subject=subject_ns,
        public_key=public_key,
        scopes=wanted,
        days=days,
        now=t,
    )


# =============================================================================
# Index reads
# =============================================================================


async def get_cert(index: Index, kid: str) -> dsse.Envelope | None:
    """The cert envelope stored for key ``kid`` (``/cpi/v1/certs/<kid>``), or ``None``."""
    kv = await index.get(Keys.cert(kid))
    if kv is None:
        return None
    try:
        return dsse.Envelope.from_json(kv.value)
    except EnvelopeError as exc:
        raise EnvelopeError(f"{Keys.cert(kid)} does not hold an envelope: {exc}") from exc


async def fetch_chain(
    index: Index, signer_kid: str, *, anchors: chain.TrustAnchors, signed: str = ""
) -> list[dsse.Envelope]:
    """Certs from ``signer_kid``'s cert up to one an anchor signed, read from ``/certs/``.

    ``signed`` names what ``signer_kid`` signed, for the error message.

    Raises:
        NotFoundError: a cert on the way is missing (its issuer was never published).
    """
    anchor_kids = {a.kid for a in anchors}
    out: list[dsse.Envelope] = []
    kid = signer_kid
    seen: set[str] = set()
    while kid not in anchor_kids and kid not in seen and len(out) <= chain.MAX_DEPTH:
        seen.add(kid)
        env = await get_cert(index, kid)
        if env is None:
            what = f"the cert for {_subject_of(out[-1])}" if out else (signed or "it")
            raise NotFoundError(
                f"cert chain is incomplete: the index has no cert for key {kid}, which signed "
                f"{what}; publish the issuing namespace first (cpi ns publish), or check the "
                f"anchor (anchors: {', '.join(anchors.subjects)})"
            )
        out.append(env)
        kid = env.keyid
    return out


def _subject_of(env: dsse.Envelope) -> str:
    try:
        return _cert_payload(env).subject
    except PayloadError:
        return "?"


async def fetch_revocations(index: Index) -> dict[str, dsse.Envelope]:
    """Every revocation in ``/cpi/v1/revoked/``, by the serial or kid it names."""
    kvs, _ = await index.get_prefix(Prefix.REVOKED)
    out: dict[str, dsse.Envelope] = {}
    for kv in kvs:
        try:
            out[parse_key(kv.key).name] = dsse.Envelope.from_json(kv.value)
        except (ValueError, EnvelopeError):
            _log.warning("ignoring malformed revocation at %s", kv.key)
    return out


@dataclass(frozen=True, slots=True)
class NsEntry:
    """The value of ``/cpi/v1/ns/<prefix>``."""

    kid: str
    endpoints: tuple[str, ...]

    def to_json(self) -> bytes:
        return json.dumps(
            {"kid": self.kid, "endpoints": list(self.endpoints)}, separators=(",", ":")
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> NsEntry:
        try:
            obj = _json.loads(data)
            kid, endpoints = obj["kid"], obj["endpoints"]
            if not isinstance(kid, str) or not isinstance(endpoints, list):
                raise TypeError("kid must be a string and endpoints a list")
            return cls(kid, tuple(str(e) for e in endpoints))
        except (ValueError, KeyError, TypeError) as exc:
            raise PayloadError(f'ns entry is not {{"kid", "endpoints"}}: {exc}') from exc


async def read_ns(index: Index, namespace: str) -> NsEntry | None:
    """The ``/ns/`` entry of ``namespace``, or ``None``."""
    kv = await index.get(Keys.ns(parse_namespace(namespace)))
    return None if kv is None else NsEntry.from_json(kv.value)


# =============================================================================
# Publishing namespaces
# =============================================================================


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidDataError(
            f"registry endpoint {url!r} is not a URL; expected http(s)://host[:port][/path]"
        )
    try:
        _ = parts.port
    except ValueError as exc:
        raise InvalidDataError(f"registry endpoint {url!r} has a bad port") from exc
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What :func:`publish_ns` did: which keys it wrote (none when all was in place)."""

    namespace: str
    kid: str
    cert_written: bool
    ns_written: bool
    revision: int

    @property
    def changed(self) -> bool:
        return self.cert_written or self.ns_written


async def publish_ns(
    index: Index,
    *,
    namespace: str,
    endpoints: Sequence[str],
    anchors: chain.TrustAnchors,
    cert: dsse.Envelope | None = None,
    now: int | None = None,
) -> PublishResult:
    """Publish a namespace: its cert under ``/certs/<kid>`` and ``/ns/<NS>``, atomically.

    The cert's chain is assembled from certs already in the index and verified against
    ``anchors`` (with the index's revocations) before anything is written; the cert
    must be for exactly ``namespace``.  Without ``cert``, ``namespace`` must be the
    subject of an anchor (the root), whose key is then the one published.

    Nothing is written when the index already holds the same cert and entry.  A
    different cert already stored for the same kid is refused: certs are permanent.

    Raises:
        ChainError: the cert does not verify up to an anchor (rule, link and reason).
        NotFoundError: the cert's issuer has no cert in the index yet.
        OutsideNamespaceError: the cert is for another subject.
        ConflictError: ``/certs/<kid>`` holds a different cert.
    """
    ns = parse_namespace(namespace)
    urls = tuple(_check_url(u) for u in endpoints)
    if cert is None:
        roots = [a for a in anchors if a.subject == ns]
        if len(roots) != 1:
            raise InvalidDataError(
                f"namespace {ns!r} needs a cert: it is not the subject of a trust anchor "
                f"(anchors: {', '.join(anchors.subjects)})"
            )
        kid = roots[0].kid
    else:
        parent = await fetch_chain(
            index, cert.keyid, anchors=anchors, signed=f"the cert for {_subject_of(cert)}"
        )
        result = chain.verify_chain(
            [cert, *parent],
            anchors=anchors,
            revocations=await fetch_revocations(index),
            now=now,
        )
        try:
            result.raise_for_failure()
        except ChainError as exc:
            raise type(exc)(
                f"cert for {_subject_of(cert)} does not verify against the anchor: {exc}",
                rule=exc.rule,
                link=exc.link,
                reason=exc.reason,
            ) from exc
        leaf = result.certs[0]
        if leaf.subject != ns:
            raise OutsideNamespaceError(
                f"cert is for subject {leaf.subject!r}, but the namespace to publish is {ns!r}"
            )
        kid = keys.kid(keys.b64url_decode(leaf.public_key))
    entry = NsEntry(kid, urls)
    ns_key = Keys.ns(ns)
    for _ in range(_PUBLISH_ATTEMPTS):
        compare: list[Cmp] = []
        ops: list[Op] = []
        if cert is not None:
            cert_key = Keys.cert(kid)
            current = await index.get(cert_key)
            if current is None:
                compare.append(Cmp.absent(cert_key))
                ops.append(Op.put(cert_key, cert.to_json()))
            else:
                try:
                    stored = dsse.Envelope.from_json(current.value)
                except EnvelopeError:
                    stored = None
                if stored != cert:
                    held = "" if stored is None else f" (subject {_subject_of(stored)})"
                    raise ConflictError(
                        f"{cert_key} already holds a different cert{held}; certs are "
                        "permanent: to change a namespace's cert, certify a new key"
                    )
                compare.append(Cmp.mod_revision(cert_key, "==", current.mod_revision))
        current_ns = await index.get(ns_key)
        if current_ns is None:
            compare.append(Cmp.absent(ns_key))
            ops.append(Op.put(ns_key, entry.to_json()))
        else:
            try:
                same = NsEntry.from_json(current_ns.value) == entry
            except PayloadError:
                same = False
            compare.append(Cmp.mod_revision(ns_key, "==", current_ns.mod_revision))
            if not same:
                ops.append(Op.put(ns_key, entry.to_json()))
        if not ops:
            _log.debug("ns %s: already published (kid %s)", ns, kid)
            return PublishResult(
                ns, kid, False, False, current_ns.mod_revision if current_ns else 0
            )
        txn = await index.txn(compare=compare, success=ops)
        if txn.succeeded:
            written = {op.key for op in ops}
            cert_written = cert is not None and Keys.cert(kid) in written
            _log.info(
                "published ns %s (kid %s, endpoints %s)%s",
                ns,
                kid,
                ", ".join(urls) or "none",
                " with its cert" if cert_written else "",
            )
            return PublishResult(ns, kid, cert_written, ns_key in written, txn.revision)
        _log.info("ns %s: index changed while publishing; reading it again", ns)
    raise ConflictError(
        f"ns {ns}: the index kept changing under the publish ({_PUBLISH_ATTEMPTS} attempts)"
    )


# =============================================================================
# Revocation
# =============================================================================


async def _find_cert(
    index: Index, *, serial: str | None, kid: str | None
) -> tuple[str, dsse.Envelope] | None:
    """The stored cert (with its kid) that a revocation names, if it is in the index."""
    if kid is not None:
        env = await get_cert(index, kid)
        return None if env is None else (kid, env)
    kvs, _ = await index.get_prefix(Prefix.CERTS)
    for kv in kvs:
        try:
            env = dsse.Envelope.from_json(kv.value)
            if _cert_payload(env).serial == serial:
                return parse_key(kv.key).name, env
        except (ValueError, EnvelopeError):
            continue
    return None


async def revoke(
    index: Index,
    *,
    issuer_key: Ed25519PrivateKey,
    subject: str,
    serial: str | None = None,
    kid: str | None = None,
    reason: str,
    now: int | None = None,
) -> tuple[dsse.Envelope, bool]:
    """Sign a ``revocation.v1`` and publish it under ``/cpi/v1/revoked/<serial-or-kid>``.

    When the revoked cert is in the index, the revocation is checked to be one that
    verifiers will honour: it must name the cert's subject and ``issuer_key`` must be
    the cert's issuer or one of its ancestors.  A key that has no cert (a node's
    record key, revoked by kid) is published as given.

    The revocation and its audit entry are written in one transaction.  Returns the
    revocation in the index and whether this call created it (``False`` when the
    target was already revoked; the existing revocation is kept).
    """
    if (serial is None) == (kid is None):
        raise InvalidDataError("revoke needs exactly one of serial or kid")
    ns = parse_namespace(subject)
    target = serial if serial is not None else str(kid)
    signer = keys.kid_of(issuer_key)
    found = await _find_cert(index, serial=serial, kid=kid)
    if found is None:
        _log.warning(
            "no cert for %s %s in the index; publishing the revocation as given",
            "serial" if serial else "kid",
            target,
        )
    else:
        cert_kid, env = found
        cert = _cert_payload(env)
        if cert.subject != ns:
            raise InvalidDataError(
                f"cert {target} is for subject {cert.subject!r}, not {ns!r}; verifiers ignore a "
                "revocation that names another subject"
            )
        above: list[str] = []
        cursor: dsse.Envelope | None = env
        seen = {cert_kid}
        while cursor is not None and cursor.keyid not in seen and len(above) <= chain.MAX_DEPTH:
            above.append(cursor.keyid)
            seen.add(cursor.keyid)
            cursor = await get_cert(index, cursor.keyid)
        if signer not in above:
            raise InvalidDataError(
                f"key {signer} did not issue cert {target} (subject {ns}) nor any cert above it "
                f"(issuers up the chain: {', '.join(above)}); verifiers would ignore this revocation"
            )
    env = ca.revoke(
        issuer_key=issuer_key, subject=ns, serial=serial, kid=kid, reason=reason, now=now
    )
    key = Keys.revoked(target)
    # the revocation and its audit entry are written in one transaction
    res = await AuditStream(index).commit(
        compare=[Cmp.absent(key)],
        success=[Op.put(key, env.to_json())],
        failure=[Op.get(key)],
        op="revoke",
        envelope=env,
        subject=ns,
    )
    if not res.succeeded:
        existing = dsse.Envelope.from_json(res.responses[0].kvs[0].value)
        try:
            old = parse_payload(existing.payload_type, existing.payload, Revocation)
            detail = f"at {old.revoked_at} by key {existing.keyid}: {old.reason}"
        except PayloadError:
            detail = f"by key {existing.keyid}"
        _log.warning("%s is already revoked %s; keeping that revocation", target, detail)
        return existing, False
    _log.info("revoked %s (%s) signed by %s: %s", target, ns, signer, reason)
    return env, True


# =============================================================================
# The seeded 1+M+N tree
# =============================================================================


@dataclass(frozen=True, slots=True)
class SeedNode:
    """One namespace of the seeded tree: ``role`` is ``region`` or ``industry``."""

    prefix: str
    role: str
    name: str
    parent: str

    @property
    def scopes(self) -> tuple[str, ...]:
        return ("delegate", "issue") if self.role == "region" else ("issue",)


def load_seeds(path: str | os.PathLike[str]) -> tuple[str, list[SeedNode]]:
    """The root prefix and the namespaces of ``seeds/namespaces.json``, parents first.

    Each namespace's parent is the longest proper ancestor in the tree (the root, a
    province, or a city-level node such as ``CN.13.1307``).
    """
    p = Path(path)
    try:
        obj: Any = _json.loads(p.read_bytes())
        root = parse_namespace(obj["root"]["prefix"])
        items = [(r, "region") for r in obj.get("regions", [])] + [
            (i, "industry") for i in obj.get("industry", [])
        ]
        entries = [
            (parse_namespace(it["prefix"]), role, str(it.get("name", ""))) for it, role in items
        ]
    except OSError as exc:
        raise InvalidDataError(f"{p}: cannot read the namespace seeds: {exc.strerror}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidDataError(
            f"{p}: expected {{'root': {{'prefix'}}, 'regions': [...], 'industry': [...]}}: {exc!r}"
        ) from exc
    known = {root} | {ns for ns, _, _ in entries}
    if len(known) != len(entries) + 1:
        raise InvalidDataError(f"{p}: a namespace is listed twice")
    nodes: list[SeedNode] = []
    for ns, role, name in entries:
        segs = ns.split(".")
        if not ns_contains(root, ns) or ns == root:
            raise OutsideNamespaceError(f"{p}: namespace {ns!r} is not below the root {root!r}")
        parent = next(
            ".".join(segs[:n]) for n in range(len(segs) - 1, 0, -1) if ".".join(segs[:n]) in known
        )
        nodes.append(SeedNode(ns, role, name, parent))
    nodes.sort(key=lambda n: (n.prefix.count("."), n.prefix))
    for n in nodes:
        if n.role == "industry" and any(m.parent == n.prefix for m in nodes):
            raise InvalidDataError(
                f"{p}: industry node {n.prefix} has namespaces below it, but gets scope issue only"
            )
    return root, nodes


def _usable_cert(
    env: dsse.Envelope, *, node: SeedNode, key: Ed25519PrivateKey, issuer_kid: str
) -> bool:
    try:
        c = _cert_payload(env)
    except PayloadError:
        return False
    return (
        env.keyid == issuer_kid
        and c.subject == node.prefix
        and c.issuer == node.parent
        and c.public_key == keys.public_to_b64url(key)
        and sorted(c.scopes) == sorted(node.scopes)
    )


async def bootstrap_tree(
    index: Index,
    *,
    seeds_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    root_key: Ed25519PrivateKey,
    endpoints_by_ns: Mapping[str, Sequence[str]],
    days: float = DEFAULT_TREE_DAYS,
    now: int | None = None,
) -> dict[str, Path]:
    """Create, certify and publish every namespace of the seeded 1+M+N tree.

    For each namespace (parents first) a key is created or reused at
    ``<data_dir>/keys/<NS>.key`` (0600) and certified by its parent: regions and
    city-level nodes get ``delegate`` and ``issue`` (from the root or their province),
    industry nodes get ``issue`` from their region.  A cert already in the index, or
    in ``<data_dir>/certs/<NS>.json``, for the same key, issuer and scopes is reused;
    otherwise a new one is issued (valid ``days``).  Then the root and every namespace
    are published with :func:`publish_ns` and ``endpoints_by_ns`` (default: none).

    Safe to run again: a second run reuses keys and certs and writes nothing to the
    index unless endpoints changed.  Returns ``{namespace: key path}`` (root excluded).
    """
    root, nodes = load_seeds(seeds_path)
    d = Path(data_dir)
    anchor = ca.make_anchor(root, root_key)
    anchors = chain.TrustAnchors([anchor])
    endpoints_by_ns = {parse_namespace(ns): urls for ns, urls in endpoints_by_ns.items()}
    unknown = set(endpoints_by_ns) - {root} - {n.prefix for n in nodes}
    if unknown:
        raise InvalidDataError(
            f"endpoints given for namespaces not in the seeded tree: {', '.join(sorted(unknown))}"
        )
    await publish_ns(
        index, namespace=root, endpoints=endpoints_by_ns.get(root, ()), anchors=anchors, now=now
    )
    signers: dict[str, Ed25519PrivateKey] = {root: root_key}
    paths: dict[str, Path] = {}
    for node in nodes:
        key_path = d / "keys" / f"{node.prefix}.key"
        cert_path = d / "certs" / f"{node.prefix}.json"
        key, created = keyfile.load_or_create(key_path)
        parent_key = signers[node.parent]
        issuer_kid = keys.kid_of(parent_key)
        cert = await get_cert(index, keys.kid_of(key))
        if cert is not None and not _usable_cert(cert, node=node, key=key, issuer_kid=issuer_kid):
            raise ConflictError(
                f"the index holds a cert for {node.prefix}'s key ({key_path}) that is not from "
                f"{node.parent} with scopes {list(node.scopes)}; move the key aside to certify a "
                "new one"
            )
        if cert is None and cert_path.exists():
            try:
                on_disk = read_cert(cert_path)
            except InvalidDataError:
                on_disk = None
            if on_disk is not None and _usable_cert(
                on_disk, node=node, key=key, issuer_kid=issuer_kid
            ):
                cert = on_disk
        if cert is None:
            cert = delegate(
                issuer_key=parent_key,
                issuer=node.parent,
                subject=node.prefix,
                public_key=key,
                scopes=node.scopes,
                days=days,
                now=now,
            )
        data = json.dumps(cert.to_dict(), indent=2).encode("utf-8") + b"\n"
        if not cert_path.exists() or cert_path.read_bytes() != data:
            _write_atomic(cert_path, data)
        await publish_ns(
            index,
            namespace=node.prefix,
            cert=cert,
            endpoints=endpoints_by_ns.get(node.prefix, ()),
            anchors=anchors,
            now=now,
        )
        if created:
            _log.info("created key for %s (%s)", node.prefix, key_path)
        signers[node.prefix] = key
        paths[node.prefix] = key_path
    return paths


USAGE_SIGNER_DAYS: Final = 365
"""Validity of the ``usagesigner.v1`` :func:`publish_usage_signer` signs."""


async def publish_usage_signer(
    index: Index,
    *,
    root_key: Ed25519PrivateKey,
    subject: str,
    key_path: str | os.PathLike[str],
    days: float = USAGE_SIGNER_DAYS,
    now: int | None = None,
) -> tuple[Ed25519PrivateKey, bool]:
    """Create the resolvers' usage signing key at ``key_path`` (0600) if missing, and
    publish its ``usagesigner.v1`` for ``subject``, signed by the root, at
    ``/cpi/v1/usagesigners/<kid>`` when absent, unreadable or within 30 days of its
    ``not_after`` (docs/protocol.md §7, Who signs receipts).  Returns the key and
    whether a statement was written."""
    path = Path(key_path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key, _ = keyfile.load_or_create(path)
    where = Keys.usage_signer(keys.kid_of(key))
    t = int(time.time()) if now is None else now
    kv = await index.get(where)
    if kv is not None:
        try:
            env = dsse.Envelope.from_json(kv.value)
            doc = parse_payload(env.payload_type, env.payload, UsageSigner)
            if doc.not_after - t > 30 * 86_400 and doc.subject == subject:
                return key, False
        except (EnvelopeError, PayloadError):
            _log.warning("%s is unreadable; publishing it again", where)
    env = sign_usage_signer(
        root_key, key, subject=subject, not_before=t - 60, not_after=t + int(days * 86_400)
    )
    await index.put(where, env.to_json())
    return key, True

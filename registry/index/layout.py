"""The key layout of docs/protocol.md §6, and the one reader of ``/alloc/`` and ``/holders/``.

Every key the project stores is built here (:class:`Keys`) and split back here
(:func:`parse_key`).  Prefix listings are plain string prefixes: ``/cpi/v1/rec/CN.3``
also lists ``CN.31/...``; segment-wise matching is what :meth:`Keys.prefixes_within` is
for: it returns ``rec/CN.3/`` (records of exactly ``CN.3``) and ``rec/CN.3.`` (its
sub-namespaces).

The values of ``/cpi/v1/alloc/<cpid>`` (units claimed on a resource) and
``/cpi/v1/holders/<name>`` (units a claims holder holds) are written by
:func:`units_json` and read by :func:`read_units`, nowhere else.

This module imports neither gRPC nor the etcd client: the resolver's pure parts and
tools import it without pulling a network stack in.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final, NamedTuple

from schemas import _json
from schemas.errors import InvalidDataError

__all__ = [
    "ROOT",
    "Keys",
    "ParsedKey",
    "Prefix",
    "parse_key",
    "read_units",
    "units_json",
]

ROOT: Final = "/cpi/v1/"


class Prefix(StrEnum):
    """The collections under :data:`ROOT`; each value is a key prefix ending in ``/``."""

    NS = "/cpi/v1/ns/"
    CERTS = "/cpi/v1/certs/"
    REC = "/cpi/v1/rec/"
    LIVE = "/cpi/v1/live/"
    CLAIM = "/cpi/v1/claim/"
    ALLOC = "/cpi/v1/alloc/"
    REVOKED = "/cpi/v1/revoked/"
    LOG = "/cpi/v1/log/"
    # write-side private collections
    TOKENS = "/cpi/v1/tokens/"
    NONCE = "/cpi/v1/nonce/"
    AUDIT = "/cpi/v1/audit/"
    SEQ = "/cpi/v1/seq/"
    # claims (resolver/claims/): API tokens and per-holder totals
    CLAIM_TOKENS = "/cpi/v1/claimtokens/"
    HOLDERS = "/cpi/v1/holders/"
    # usage receipts (resolver/claims/usage.py): the open meter of each metered claim,
    # the signed receipts, and the anchor-signed statements naming the receipt keys
    METER = "/cpi/v1/meter/"
    USAGE = "/cpi/v1/usage/"
    USAGE_SIGNERS = "/cpi/v1/usagesigners/"


# Collections whose names are CPIDs (``<prefix>/<suffix>``), hence per-namespace ranges.
_CPID_COLLECTIONS: Final = frozenset(
    {Prefix.REC, Prefix.LIVE, Prefix.CLAIM, Prefix.ALLOC, Prefix.SEQ}
)
_BAD_CHARS: Final = re.compile(r"[\x00-\x20\x7f]")
_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_SEQ_DIGITS: Final = 20  # enough for any unsigned 64-bit number; keeps keys sortable


def _name(value: str, what: str, *, slashes: int = 0) -> str:
    """Check one name used inside a key; it must contain exactly *slashes* ``/``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string, got {value!r}")
    if _BAD_CHARS.search(value):
        raise ValueError(f"{what} {value!r} contains whitespace or control characters")
    if value.count("/") != slashes:
        raise ValueError(f"{what} {value!r} contains {value.count('/')} '/', expected {slashes}")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(f"{what} {value!r} has an empty, '.' or '..' path segment")
    return value


def _seq(n: int, what: str) -> str:
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < 10**_SEQ_DIGITS:
        raise ValueError(f"{what} must be an integer in [0, 10**{_SEQ_DIGITS}), got {n!r}")
    return f"{n:0{_SEQ_DIGITS}d}"


class Keys:
    """Builders for every key the project stores.  Nothing else may build key strings.

    Names are checked (non-empty, no whitespace, the right number of ``/``) but not
    normalised: CPIDs and prefixes must already be canonical (see :mod:`schemas`).
    """

    @staticmethod
    def ns(prefix: str) -> str:
        """``/cpi/v1/ns/<prefix>``: a namespace's current key id and endpoints."""
        return Prefix.NS + _name(prefix, "namespace prefix")

    @staticmethod
    def cert(kid: str) -> str:
        """``/cpi/v1/certs/<kid>``: the ``cert.v1`` envelope certifying key *kid*."""
        return Prefix.CERTS + _name(kid, "kid")

    @staticmethod
    def rec(cpid: str) -> str:
        """``/cpi/v1/rec/<cpid>``: the signed record."""
        return Prefix.REC + _name(cpid, "CPID", slashes=1)

    @staticmethod
    def live(cpid: str) -> str:
        """``/cpi/v1/live/<cpid>``: the latest status envelope (on the registry's lease)."""
        return Prefix.LIVE + _name(cpid, "CPID", slashes=1)

    @staticmethod
    def seq(cpid: str) -> str:
        """``/cpi/v1/seq/<cpid>``: the last accepted status ``seq`` of a CPID, as
        ``{"seq": N, "observed_at": ms}`` (permanent; deleted with the record)."""
        return Prefix.SEQ + _name(cpid, "CPID", slashes=1)

    @staticmethod
    def claim(cpid: str, claim_id: str) -> str:
        """``/cpi/v1/claim/<cpid>/<claim-id>``: one claim (on its own lease)."""
        return Keys.claims(cpid) + _name(claim_id, "claim id")

    @staticmethod
    def claims(cpid: str) -> str:
        """``/cpi/v1/claim/<cpid>/``: prefix of every claim on *cpid*."""
        return Prefix.CLAIM + _name(cpid, "CPID", slashes=1) + "/"

    @staticmethod
    def alloc(cpid: str) -> str:
        """``/cpi/v1/alloc/<cpid>``: units currently claimed (the CAS point for claims)."""
        return Prefix.ALLOC + _name(cpid, "CPID", slashes=1)

    @staticmethod
    def revoked(kid_or_serial: str) -> str:
        """``/cpi/v1/revoked/<kid-or-serial>``: a revocation envelope."""
        return Prefix.REVOKED + _name(kid_or_serial, "kid or serial")

    @staticmethod
    def log(*parts: str) -> str:
        """``/cpi/v1/log/<part>/<part>...``: transparency-log keys (layout owned by the log)."""
        if not parts:
            raise ValueError("a log key needs at least one part")
        return Prefix.LOG + "/".join(_name(p, "log key part") for p in parts)

    @staticmethod
    def log_entry(index: int) -> str:
        """``/cpi/v1/log/entry/<zero-padded index>``: one log leaf; keys sort by index."""
        return Keys.log("entry", _seq(index, "log index"))

    @staticmethod
    def log_head(tree_size: int) -> str:
        """``/cpi/v1/log/head/<zero-padded size>``: the signed tree head at *tree_size*."""
        return Keys.log("head", _seq(tree_size, "tree size"))

    @staticmethod
    def token(sha256_hex: str) -> str:
        """``/cpi/v1/tokens/<sha256-hex>``: a join token, stored by hash only."""
        if not isinstance(sha256_hex, str) or not _SHA256_HEX.fullmatch(sha256_hex):
            raise ValueError(
                f"token key must be 64 lower-case hex digits (a SHA-256), got {sha256_hex!r}"
            )
        return Prefix.TOKENS + sha256_hex

    @staticmethod
    def claim_token(sha256_hex: str) -> str:
        """``/cpi/v1/claimtokens/<sha256-hex>``: a claims API token, stored by hash only."""
        if not isinstance(sha256_hex, str) or not _SHA256_HEX.fullmatch(sha256_hex):
            raise ValueError(
                f"claims token key must be 64 lower-case hex digits (a SHA-256), got {sha256_hex!r}"
            )
        return Prefix.CLAIM_TOKENS + sha256_hex

    @staticmethod
    def holder(name: str) -> str:
        """``/cpi/v1/holders/<name>``: units a claims holder holds (the CAS point for quotas)."""
        return Prefix.HOLDERS + _name(name, "holder name")

    @staticmethod
    def meter(claim_id: str) -> str:
        """``/cpi/v1/meter/<claim-id>``: the open usage period of a metered claim."""
        return Prefix.METER + _name(claim_id, "claim id")

    @staticmethod
    def usage(claim_id: str, n: int) -> str:
        """``/cpi/v1/usage/<claim-id>/<zero-padded n>``: receipt ``n`` (from 1) of a claim."""
        return Prefix.USAGE + Keys.receipt(claim_id, n)

    @staticmethod
    def receipt(claim_id: str, n: int) -> str:
        """``<claim-id>/<zero-padded n>``: a receipt's name below ``/usage/`` (the
        ``receipt`` member of its audit entry)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"receipt numbers start at 1, got {n!r}")
        return _name(claim_id, "claim id") + "/" + _seq(n, "receipt number")

    @staticmethod
    def usage_signer(kid: str) -> str:
        """``/cpi/v1/usagesigners/<kid>``: the anchor-signed ``usagesigner.v1`` of key *kid*."""
        return Prefix.USAGE_SIGNERS + _name(kid, "kid")

    @staticmethod
    def nonce(kid: str, nonce: str) -> str:
        """``/cpi/v1/nonce/<kid>/<nonce>``: a used nonce (replay protection)."""
        return Keys.nonces(kid) + _name(nonce, "nonce")

    @staticmethod
    def nonces(kid: str) -> str:
        """``/cpi/v1/nonce/<kid>/``: prefix of every nonce used by *kid*."""
        return Prefix.NONCE + _name(kid, "kid") + "/"

    @staticmethod
    def audit(seq: int) -> str:
        """``/cpi/v1/audit/<zero-padded seq>``: one entry of the append-only audit stream."""
        return Prefix.AUDIT + _seq(seq, "audit sequence number")

    @staticmethod
    def prefixes_within(collection: Prefix, namespace: str) -> tuple[str, str]:
        """The two prefixes covering *namespace* and its sub-namespaces in *collection*.

        ``(f"{collection}{ns}/", f"{collection}{ns}.")``: the first holds names of exactly
        *namespace* (``CN.3/...``), the second every sub-namespace (``CN.3.X/...``), and
        neither matches a sibling such as ``CN.31``.  *collection* must be one whose names
        are CPIDs (REC, LIVE, CLAIM, ALLOC, SEQ).
        """
        if collection not in _CPID_COLLECTIONS:
            raise ValueError(f"collection {collection.name} is not keyed by CPID")
        ns = _name(namespace, "namespace prefix")
        return collection + ns + "/", collection + ns + "."

    @staticmethod
    def rec_prefix_for_namespace(namespace: str) -> str:
        """``/cpi/v1/rec/<ns>/``: records of exactly *namespace* (not ``<ns>1``, not ``<ns>.X``)."""
        return Keys.prefixes_within(Prefix.REC, namespace)[0]

    @staticmethod
    def rec_prefixes_within(namespace: str) -> tuple[str, str]:
        """Record prefixes of *namespace* itself and of all its sub-namespaces."""
        return Keys.prefixes_within(Prefix.REC, namespace)


class ParsedKey(NamedTuple):
    """A key split into its collection and the name after the collection prefix."""

    collection: Prefix
    name: str

    @property
    def parts(self) -> tuple[str, ...]:
        """The builder arguments: ``(cpid, claim_id)`` for claims, ``(kid, nonce)`` for
        nonces, the path segments for log keys, ``(name,)`` otherwise."""
        if self.collection is Prefix.CLAIM:
            cpid, claim_id = self.name.rsplit("/", 1)
            return cpid, claim_id
        if self.collection is Prefix.NONCE:
            kid, nonce = self.name.split("/", 1)
            return kid, nonce
        if self.collection is Prefix.USAGE:
            claim_id, n = self.name.split("/", 1)
            return claim_id, n
        if self.collection is Prefix.LOG:
            return tuple(self.name.split("/"))
        return (self.name,)


_SHAPES: Final[dict[Prefix, int]] = {  # number of "/" in a well-formed name
    Prefix.NS: 0,
    Prefix.CERTS: 0,
    Prefix.REC: 1,
    Prefix.LIVE: 1,
    Prefix.CLAIM: 2,
    Prefix.ALLOC: 1,
    Prefix.REVOKED: 0,
    Prefix.TOKENS: 0,
    Prefix.NONCE: 1,
    Prefix.AUDIT: 0,
    Prefix.SEQ: 1,
    Prefix.CLAIM_TOKENS: 0,
    Prefix.HOLDERS: 0,
    Prefix.METER: 0,
    Prefix.USAGE: 1,
    Prefix.USAGE_SIGNERS: 0,
}


def parse_key(key: str) -> ParsedKey:
    """Split a key built by :class:`Keys` back into ``(collection, name)``.

    Raises:
        ValueError: the key is outside the layout or its name has the wrong shape.
    """
    for collection in Prefix:
        if key.startswith(collection):
            name = key[len(collection) :]
            if collection is Prefix.LOG:
                _name(name, "log key", slashes=name.count("/"))
            else:
                _name(name, f"{collection.name.lower()} name", slashes=_SHAPES[collection])
            return ParsedKey(collection, name)
    raise ValueError(f"key {key!r} is not in the CPI key layout (expected it under {ROOT}...)")


# =============================================================================
# /alloc/ and /holders/ values
# =============================================================================


def units_json(units: int) -> bytes:
    """The value stored at ``/alloc/<cpid>`` and ``/holders/<name>``: ``{"units":N}``."""
    if not isinstance(units, int) or isinstance(units, bool) or units < 0:
        raise ValueError(f"units must be a non-negative integer, got {units!r}")
    return b'{"units":%d}' % units


def read_units(value: bytes | None) -> int:
    """Units in an ``/alloc/`` or ``/holders/`` value; 0 when the key is absent (``None``).

    A readable value is what :func:`units_json` writes, ``{"units": N}``, or a bare
    ``N``, with ``N`` a non-negative JSON integer.

    Raises:
        InvalidDataError: anything else (not JSON, not a number, negative, a boolean).
            There is no safe default for every caller, so each decides: a count of
            claimed units shown to a node may treat it as nothing claimed, while
            discovery and claims must treat the resource as unavailable.
    """
    if value is None:
        return 0
    try:
        obj = _json.loads(value)
    except ValueError:  # includes nesting deeper than 16 levels
        obj = None
    if isinstance(obj, dict):
        obj = obj.get("units")
    if isinstance(obj, int) and not isinstance(obj, bool) and obj >= 0:
        return obj
    raise InvalidDataError(
        f'unreadable units value {bytes(value[:64])!r}: expected {{"units": N}} or N, '
        "N a non-negative integer"
    )

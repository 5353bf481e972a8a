"""Usage receipts (``usage.v1``) and the statement naming their signing key
(``usagesigner.v1``); docs/protocol.md §4 and §7.  No I/O.

A ``usage.v1`` says that ``holder`` held ``units`` of ``cpid`` from ``start`` to ``end``
(Unix seconds) under claim ``claim_id``; ``n`` numbers the receipts of one claim (a
renewal closes one period and opens the next), ``reason`` says what ended the period.
A gang claim (units on several resources under one claim id) gets one receipt per
period, whose ``cpid`` is the gang's anchor, ``units`` its total and ``parts`` the units
of each resource (the anchor first).
It is signed by a usage signing key; a ``usagesigner.v1``, signed by a trust anchor's
key, names that key and the namespace whose resources' receipts it may sign.
"""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas import dsse
from schemas import keys as _keys
from schemas.dsse import Envelope
from schemas.models import MAX_INT, CPIDStr, Document, Namespace, PublicKey, Timestamp

__all__ = [
    "HOLDER_PATTERN",
    "MAX_RECEIPTS",
    "MAX_RECEIPT_BYTES",
    "MAX_USAGE_BYTES",
    "MAX_USAGE_PARTS",
    "MAX_USAGE_UNITS",
    "USAGE_REASONS",
    "Usage",
    "UsagePart",
    "UsageSigner",
    "sign_usage_signer",
]

MAX_USAGE_BYTES: Final = 1024
"""A ``usagesigner.v1`` payload is at most 1 KiB."""
MAX_RECEIPT_BYTES: Final = 16384
"""A ``usage.v1`` payload is at most 16 KiB (a gang's receipt lists up to 63 parts)."""
MAX_USAGE_PARTS: Final = 63
"""The most parts a gang's receipt lists (etcd's 128 operations per transaction)."""
MAX_USAGE_UNITS: Final = 1 << 20
"""The claims service's bound on the units of one claim."""
MAX_RECEIPTS: Final = 1_000_000
"""Receipts of one claim at most (one per renewal, plus the last)."""
HOLDER_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
USAGE_REASONS: Final = ("release", "expiry", "renewal")

_CLAIM_ID: Final = re.compile(r"^[^~/\s]+~[^~/\s]+~[A-Za-z0-9_-]{16,64}$")


class UsagePart(BaseModel):
    """One resource of a gang's receipt: ``units`` of ``cpid``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    cpid: CPIDStr
    units: Annotated[int, Field(ge=1, le=MAX_USAGE_UNITS)]


class Usage(Document):
    """One usage receipt: ``units`` of ``cpid`` held by ``holder`` over ``[start, end]``;
    for a gang, ``cpid`` is its anchor, ``units`` its total and ``parts`` every
    resource's units (the anchor first, each CPID once, summing to ``units``)."""

    TYPE: ClassVar[str] = "usage.v1"
    MAX_BYTES: ClassVar[int | None] = MAX_RECEIPT_BYTES
    type: Literal["usage.v1"] = "usage.v1"
    claim_id: Annotated[str, Field(min_length=1, max_length=200)]
    n: Annotated[int, Field(ge=1, le=MAX_RECEIPTS)]
    holder: Annotated[str, Field(pattern=HOLDER_PATTERN)]
    cpid: CPIDStr
    units: Annotated[int, Field(ge=1, le=MAX_USAGE_UNITS)]
    start: Timestamp
    end: Timestamp
    reason: Literal["release", "expiry", "renewal"]
    parts: Annotated[list[UsagePart], Field(min_length=2, max_length=MAX_USAGE_PARTS)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Usage:
        if self.parts is not None:
            if self.parts[0].cpid != self.cpid:
                raise ValueError(
                    f"the first part is {self.parts[0].cpid}, not the anchor {self.cpid}"
                )
            if len({p.cpid for p in self.parts}) != len(self.parts):
                raise ValueError("a CPID appears in two parts")
            if sum(p.units for p in self.parts) != self.units:
                raise ValueError(f"the parts' units do not add up to {self.units}")
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        if not _CLAIM_ID.fullmatch(self.claim_id):
            raise ValueError(f"claim_id {self.claim_id!r} is not <prefix>~<suffix>~<random>")
        if not self.claim_id.startswith(self.cpid.replace("/", "~") + "~"):
            raise ValueError(f"claim_id {self.claim_id!r} does not name {self.cpid}")
        return self

    @property
    def unit_seconds(self) -> int:
        """``units × (end − start)``."""
        return self.units * (self.end - self.start)

    def split(self) -> list[tuple[str, int]]:
        """``(cpid, units)`` of every resource: the parts of a gang, else the one."""
        if self.parts is None:
            return [(self.cpid, self.units)]
        return [(p.cpid, p.units) for p in self.parts]


class UsageSigner(Document):
    """A trust anchor's statement: ``public_key`` signs usage receipts for resources of
    ``subject`` (and the namespaces below it) from ``not_before`` to ``not_after``."""

    TYPE: ClassVar[str] = "usagesigner.v1"
    MAX_BYTES: ClassVar[int | None] = MAX_USAGE_BYTES
    type: Literal["usagesigner.v1"] = "usagesigner.v1"
    subject: Namespace
    public_key: PublicKey
    not_before: Timestamp
    not_after: Annotated[int, Field(ge=0, le=MAX_INT)]

    @model_validator(mode="after")
    def _window(self) -> UsageSigner:
        if self.not_after <= self.not_before:
            raise ValueError(
                f"not_after {self.not_after} is not after not_before {self.not_before}"
            )
        return self


def sign_usage_signer(
    anchor_key: Ed25519PrivateKey,
    public_key: Ed25519PublicKey | Ed25519PrivateKey,
    *,
    subject: str,
    not_before: int,
    not_after: int,
) -> Envelope:
    """A ``usagesigner.v1`` for ``public_key``, signed by the anchor key ``anchor_key``
    (stored at ``/cpi/v1/usagesigners/<kid of public_key>``)."""
    doc = UsageSigner(
        subject=subject,
        public_key=_keys.public_to_b64url(public_key),
        not_before=not_before,
        not_after=not_after,
    )
    return dsse.sign(UsageSigner.media_type(), doc.to_json(), anchor_key)

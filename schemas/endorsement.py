"""``endorsement.v1``: one root vouching for another root's anchor (docs/protocol.md §10). No I/O.

An endorsement is a DSSE envelope signed by the anchor key of root ``issuer`` (say
``CN``) stating that root ``subject`` (say ``SG``) has the anchor key ``public_key``,
from ``not_before`` to ``not_after``, and may speak only for the namespaces listed in
``permitted`` (each inside ``subject``).  A client that trusts ``CN``'s anchor alone
can then verify ``SG`` records: :func:`schemas.chain.endorsed_anchors` turns valid
endorsements into extra anchors that carry the name constraints.

Bounds: both roots are single segments and differ; ``permitted`` holds 1 to 16
namespaces without repeats; the window is at most :data:`MAX_WINDOW_S` long; the
payload is at most 2 KiB.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Final, Literal

from pydantic import Field, model_validator

from schemas import cpid as _cpid
from schemas.models import Document, Namespace, PublicKey, Serial, Timestamp

__all__ = ["MAX_PERMITTED", "MAX_WINDOW_S", "Endorsement"]

MAX_WINDOW_S: Final = 366 * 86_400
"""Longest validity window of an endorsement: short-lived statements, renewed, are the
revocation story for clients that only hold a copy (docs/protocol.md §10)."""
MAX_PERMITTED: Final = 16


class Endorsement(Document):
    """Root ``issuer`` says: root ``subject``'s anchor key is ``public_key``."""

    TYPE: ClassVar[str] = "endorsement.v1"
    MAX_BYTES: ClassVar[int | None] = 2048
    type: Literal["endorsement.v1"] = "endorsement.v1"
    issuer: Namespace
    subject: Namespace
    public_key: PublicKey
    permitted: Annotated[list[Namespace], Field(min_length=1, max_length=MAX_PERMITTED)]
    serial: Serial
    not_before: Timestamp
    not_after: Timestamp

    @model_validator(mode="after")
    def _rules(self) -> Endorsement:
        for what, ns in (("issuer", self.issuer), ("subject", self.subject)):
            if "." in ns:
                raise ValueError(f"{what} {ns!r} is not a root (one segment, e.g. 'SG')")
        if self.issuer == self.subject:
            raise ValueError(f"a root does not endorse itself ({self.issuer!r})")
        if len(set(self.permitted)) != len(self.permitted):
            raise ValueError(f"permitted {self.permitted} repeats a namespace")
        for ns in self.permitted:
            if not _cpid.ns_contains(self.subject, ns):
                raise ValueError(f"permitted namespace {ns!r} is not inside {self.subject!r}")
        if self.not_after <= self.not_before:
            raise ValueError(
                f"not_after {self.not_after} is not after not_before {self.not_before}"
            )
        if self.not_after - self.not_before > MAX_WINDOW_S:
            raise ValueError(
                f"validity window of {self.not_after - self.not_before} s exceeds {MAX_WINDOW_S} s"
            )
        return self

    def permits(self, namespace: str) -> bool:
        """Whether ``namespace`` (canonical) is inside one of the permitted namespaces."""
        return any(_cpid.ns_contains(p, namespace) for p in self.permitted)

"""Assembling the chain for a signed document from certs stored by key id. No I/O.

Certificates live once in the index, under ``/cpi/v1/certs/<kid>`` of the key they
certify.  The chain of a record is found by following signature key ids: the record's
signer kid names the first cert, that cert's signer kid names the next, until a kid
that belongs to a trust anchor.  Served bundles carry that chain so an auditor holding
only the anchor can verify offline.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from schemas.chain import MAX_DEPTH
from schemas.dsse import Envelope

__all__ = ["assemble_chain", "bundle_dict"]


def assemble_chain(
    signer_kid: str,
    certs: Mapping[str, Envelope] | Callable[[str], Envelope | None],
    *,
    anchor_kids: Collection[str],
) -> list[Envelope]:
    """Cert envelopes from ``signer_kid``'s cert up to the one an anchor signed.

    Stops early (returning what it found) when a cert is missing or the walk exceeds
    the depth limit: verification then reports the broken chain with its rule and link.
    """
    lookup = certs.get if isinstance(certs, Mapping) else certs
    chain: list[Envelope] = []
    kid = signer_kid
    seen: set[str] = set()
    while kid not in anchor_kids and kid not in seen and len(chain) <= MAX_DEPTH:
        seen.add(kid)
        env = lookup(kid)
        if env is None:
            break
        chain.append(env)
        kid = env.keyid
    return chain


def bundle_dict(record: Envelope, chain: list[Envelope], **extra: Any) -> dict[str, Any]:
    """The JSON shape served for a record: ``{"record", "chain", ...}``."""
    return {"record": record.to_dict(), "chain": [c.to_dict() for c in chain], **extra}

"""Usage receipts: what ends a claim appends a signed ``usage.v1`` to the transparency log.

A **metered** claim is one whose claim transaction also wrote its meter,
``/cpi/v1/meter/<claim-id>`` = ``{"claim_id", "cpid", "holder", "units", "start",
"expires_at", "n"}`` (no lease: it outlives the claim key).  A gang has one meter, with
``cpid`` its anchor, ``units`` its total and ``"parts": [{"cpid", "units"}, ...]``, and
one receipt per period listing the same parts (one receipt, not one per part: a gang's
release already takes 2 operations per part of etcd's 128 per transaction).  Whatever ends the claim's
current period, in the **same etcd transaction** as the change that ends it:

* compares the meter's ``mod_revision`` (unchanged since read), the receipt key
  ``/cpi/v1/usage/<claim-id>/<n>`` absent, and the audit head (:mod:`registry.index.auditlog`);
* puts the receipt, a ``usage.v1`` DSSE envelope signed with the usage key, and the
  audit entry ``{"seq", "op": "usage", "cpid", "receipt": "<claim-id>/<n>", "digest",
  "time"}`` naming it;
* deletes the meter (release, expiry) or moves it to the next period (renewal:
  ``start`` = this receipt's ``end``, ``n + 1``, the new ``expires_at``).

So a receipt exists exactly when its period ended: a failed transaction writes none, a
second attempt finds the meter moved or the receipt present, and an expiry that etcd
applied alone (the lease ran out, no resolver running) leaves the meter, from which the
reconciler writes the receipt later (``end`` = the meter's ``expires_at``).

Claims made by a service without a usage key have no meter and get no receipt.

:class:`UsageRecorder` builds these parts and commits them with the caller's own
compares and ops through the shared audit-append code (:mod:`registry.index.auditlog`);
:class:`resolver.claims.service.ClaimService` uses it in its release, purge and
reconcile transactions, and a renewal with
:meth:`~resolver.claims.service.ClaimService.usage_parts` and
:meth:`~resolver.claims.service.ClaimService.usage_commit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from registry.index import KV, Cmp, Index, Keys, Op, TxnResult
from registry.index.auditlog import AuditStream, Entry
from resolver.claims.model import Claim
from schemas import _json, dsse
from schemas import keys as _keys
from schemas.dsse import Envelope
from schemas.errors import KeyFileError
from schemas.usage import MAX_USAGE_PARTS, Usage, UsagePart

__all__ = [
    "ENV_USAGE_KEY",
    "NO_RECEIPT",
    "Meter",
    "Reason",
    "UsageParts",
    "UsageRecorder",
    "load_usage_key",
    "recorder_from_env",
]

ENV_USAGE_KEY: Final = "CPI_RESOLVER_USAGE_KEY"
"""Path of the resolver's usage signing key (Ed25519 PKCS#8 PEM, mode 0600)."""

Reason = Literal["release", "expiry", "renewal"]


def load_usage_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The usage signing key from a 0600 PEM file (KeyFileError otherwise)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode & 0o777
    except OSError as exc:
        raise KeyFileError(f"usage key {p}: {exc.strerror or exc}") from exc
    if mode & 0o077:
        raise KeyFileError(f"usage key {p} has mode {mode:o}; it must be 0600")
    return _keys.private_from_pem(p.read_bytes())


@dataclass(frozen=True, slots=True)
class Meter:
    """The open period of a metered claim (``/cpi/v1/meter/<claim-id>``)."""

    claim_id: str
    cpid: str
    holder: str
    units: int
    start: int
    expires_at: int
    n: int
    parts: tuple[tuple[str, int], ...] = ()
    """A gang's ``(cpid, units)`` per resource, the anchor first (empty: one resource)."""

    @classmethod
    def of(cls, claim: Claim) -> Meter:
        """The first period of a new claim; for a gang, pass it as a whole (its anchor's
        CPID, the total units and every part)."""
        parts = tuple(claim.parts) if claim.is_gang and len(claim.parts) > 1 else ()
        return cls(
            claim.claim_id,
            claim.cpid,
            claim.holder,
            sum(u for _, u in parts) if parts else claim.units,
            claim.created_at,
            claim.expires_at,
            1,
            parts,
        )

    def to_json(self) -> bytes:
        obj: dict[str, Any] = dataclasses.asdict(self)
        del obj["parts"]
        if self.parts:
            obj["parts"] = [{"cpid": c, "units": u} for c, u in self.parts]
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Meter:
        """``ValueError`` when the value is not a meter."""
        obj = _json.loads(data)
        if not isinstance(obj, dict):
            raise ValueError("meter value is not a JSON object")
        out: dict[str, Any] = {"parts": _meter_parts(obj.get("parts"))}
        for f in dataclasses.fields(cls):
            if f.name == "parts":
                continue
            v = obj.get(f.name)
            want = str if f.name in ("claim_id", "cpid", "holder") else int
            if not isinstance(v, want) or isinstance(v, bool):
                raise ValueError(f"meter member {f.name!r} is {v!r}")
            out[f.name] = v
        if out["units"] < 1 or out["n"] < 1 or out["start"] < 0:
            raise ValueError("meter units, n or start out of range")
        parts = out["parts"]
        if parts and (parts[0][0] != out["cpid"] or sum(u for _, u in parts) != out["units"]):
            raise ValueError("meter parts do not start at its cpid or add up to its units")
        return cls(**out)


def _meter_parts(value: object) -> tuple[tuple[str, int], ...]:
    """A meter's ``parts`` (absent: none); ``ValueError`` when malformed."""
    if value is None:
        return ()
    if not isinstance(value, list) or not 2 <= len(value) <= MAX_USAGE_PARTS:
        raise ValueError(f"meter parts must be a list of 2 to {MAX_USAGE_PARTS} parts")
    out: list[tuple[str, int]] = []
    for item in value:
        cpid = item.get("cpid") if isinstance(item, dict) else None
        units = item.get("units") if isinstance(item, dict) else None
        if not isinstance(cpid, str) or not isinstance(units, int) or isinstance(units, bool):
            raise ValueError(f"meter part {item!r} is not {{cpid, units}}")
        if units < 1:
            raise ValueError(f"meter part {cpid} has {units} units")
        out.append((cpid, units))
    if len({c for c, _ in out}) != len(out):
        raise ValueError("a CPID appears in two meter parts")
    return tuple(out)


@dataclass(frozen=True, slots=True)
class UsageParts:
    """What a transaction that ends a claim's period adds to its own compares and ops:
    the meter compared unchanged and the receipt key absent; the receipt put and the
    meter deleted or moved.  Commit them with :meth:`UsageRecorder.commit`, which adds
    the audit entry.  Empty (no receipt) for a claim without a meter."""

    compare: tuple[Cmp, ...] = ()
    success: tuple[Op, ...] = ()
    receipt: Usage | None = None
    envelope: Envelope | None = None
    name: str = ""
    """``<claim-id>/<n>``: the receipt's key below ``/cpi/v1/usage/``."""


NO_RECEIPT: Final = UsageParts()


class UsageRecorder:
    """Signs receipts with ``key``, builds the parts that write them (see the module) and
    commits them through an :class:`~registry.index.auditlog.AuditStream`, which appends
    the audit entry and group-commits concurrent appends (receipts of different claims
    share one transaction, each caller still getting the outcome of its own compares)."""

    def __init__(
        self, index: Index, key: Ed25519PrivateKey, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._index = index
        self._key = key
        self._clock = clock
        self.kid = _keys.kid_of(key)
        self.stream = AuditStream(index)
        self.written = 0
        """Receipts this recorder committed."""

    def meter_op(self, claim: Claim) -> Op:
        """The put that meters a new claim (in the claim's own transaction)."""
        return Op.put(Keys.meter(claim.claim_id), Meter.of(claim).to_json())

    async def parts(
        self,
        claim_id: str,
        *,
        end: int,
        reason: Reason,
        meter: KV | Literal["read"] | None = "read",
        renew_until: int | None = None,
        expires_at: int | None = None,
    ) -> UsageParts:
        """The parts that close the current period of ``claim_id`` at ``end``.

        ``meter`` is the meter's KV when the caller read it (``None``: absent), else it
        is read here.  ``renew_until``: a renewal; the meter moves to the next period,
        which ends at ``renew_until``.  ``expires_at``: the claim key's, when the caller
        has it (a claim extended without moving its meter still bills to its real end);
        ``end`` is never later than it (nor than the meter's when not given).  No
        meter, or an unreadable one: no receipt.
        """
        if meter == "read":
            meter = await self._index.get(Keys.meter(claim_id))
        if meter is None:
            return NO_RECEIPT
        try:
            m = Meter.from_json(meter.value)
        except ValueError:
            return NO_RECEIPT
        limit = m.expires_at if expires_at is None else max(m.expires_at, expires_at)
        stop = max(m.start, min(int(end), limit))
        try:
            receipt = Usage(
                claim_id=m.claim_id,
                n=m.n,
                holder=m.holder,
                cpid=m.cpid,
                units=m.units,
                start=m.start,
                end=stop,
                reason=reason,
                parts=[UsagePart(cpid=c, units=u) for c, u in m.parts] if m.parts else None,
            )
        except ValueError:
            return NO_RECEIPT  # a meter no receipt can be made of (not ours)
        env = dsse.sign(Usage.media_type(), receipt.to_json(), self._key)
        meter_key = Keys.meter(claim_id)
        if renew_until is None:
            move = Op.delete(meter_key)
        else:
            nxt = dataclasses.replace(m, start=stop, n=m.n + 1, expires_at=int(renew_until))
            move = Op.put(meter_key, nxt.to_json())
        return UsageParts(
            compare=(
                Cmp.mod_revision(meter_key, "==", meter.mod_revision),
                Cmp.absent(Keys.usage(m.claim_id, m.n)),
            ),
            success=(Op.put(Keys.usage(m.claim_id, m.n), env.to_json()), move),
            receipt=receipt,
            envelope=env,
            name=Keys.receipt(m.claim_id, m.n),
        )

    async def commit(
        self,
        parts: UsageParts | Sequence[UsageParts],
        *,
        compare: Sequence[Cmp] = (),
        success: Sequence[Op] = (),
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """Run the caller's transaction with ``parts`` (one, or several: the parts of a
        claim ended at once) and each receipt's audit entry.

        The result is the caller's, as :meth:`Index.txn` gives it: ``responses`` of the
        caller's ``success`` ops (then the parts'), or of ``failure`` when a compare of
        the caller's or of the parts failed.  Without a receipt it is a plain transaction.
        """
        every = [parts] if isinstance(parts, UsageParts) else list(parts)
        real = [p for p in every if p.receipt is not None and p.envelope is not None]
        if not real:
            return await self._index.txn(compare=compare, success=success, failure=failure)
        entries = []
        for p in real:
            assert p.receipt is not None and p.envelope is not None
            entries.append(Entry("usage", p.envelope, cpid=p.receipt.cpid, receipt=p.name))
        result = await self.stream.commit_entries(
            compare=[*compare, *(c for p in real for c in p.compare)],
            success=[*success, *(o for p in real for o in p.success)],
            failure=failure,
            entries=entries,
        )
        if result.succeeded:
            self.written += len(real)
        return result


def recorder_from_env(index: Index, env: Mapping[str, str] | None = None) -> UsageRecorder | None:
    """A recorder with the key named by ``$CPI_RESOLVER_USAGE_KEY`` (None when unset).

    Raises KeyFileError when the variable names a key that cannot be used (a resolver
    told to sign receipts must not silently stop)."""
    path = (os.environ if env is None else env).get(ENV_USAGE_KEY, "").strip()
    if not path:
        return None
    return UsageRecorder(index, load_usage_key(path))

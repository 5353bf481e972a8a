"""Envelopes held compactly: what the replica keeps of each record and status.

A verified record or status is kept as received, but as one :class:`Sealed` object:
its payload type and signer's key id (strings the replica shares among records) and
ONE bytes object, the signature then the payload.  An
:class:`~schemas.dsse.Envelope` with its signature tuple, signature object and two
bytes objects cost ~150 bytes more, twice per record.  The verification workers hand
envelopes back sealed (:func:`seal`), so the replica's process keeps what it receives
without copying it.

Records and statuses -- the two payload types a replica holds a million of -- are kept
compressed (:class:`Packed`): raw DEFLATE with a preset dictionary per payload type
(:data:`DICTIONARIES`), built here from the contract: representative ``record.v1`` and
``status.v1`` payloads serialized as the registry and the node agent write them, so the
keys, their order and the common values a payload repeats cost a few bytes each.  A
payload that does not get smaller is kept as it is.  Clients never see the compressed
form: :meth:`Sealed.envelope` gives back the bytes received, exactly.

The dictionaries are part of the replica snapshot's format (:data:`DICTIONARIES_DIGEST`
goes into its header): compressed blobs written with other dictionaries cannot be read.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping
from typing import Final

from schemas import cpid as _cpid
from schemas import keys as _keys
from schemas.dsse import MAX_ENVELOPE_BYTES, Envelope, Signature
from schemas.models import (
    METRICS,
    Accelerator,
    Attributes,
    Capacity,
    CpuInfo,
    Endpoint,
    Location,
    Record,
    Status,
)

__all__ = ["DICTIONARIES", "DICTIONARIES_DIGEST", "Packed", "Sealed", "seal"]

_SIG: Final = 64
_WBITS: Final = -15  # raw DEFLATE: no zlib header or checksum (the signature covers it)
_LEVEL: Final = 9
_MAX_PAYLOAD: Final = MAX_ENVELOPE_BYTES
"""Largest payload kept compressed (and so the most decompression ever yields): no
payload of a valid envelope is longer."""


class Sealed:
    """A verified-or-pending envelope held compactly: its payload type and signer's key
    id (shared among records) and ONE bytes object, signature then payload.  An
    :class:`~schemas.dsse.Envelope` with its signature tuple, signature object and two
    bytes objects cost ~150 bytes more, twice per record.  :meth:`envelope` rebuilds
    the envelope exactly as received (for rendering, re-verification, snapshots).

    Equal envelopes compare equal (and hash alike) whichever form holds them
    (:class:`Sealed`, :class:`Packed`)."""

    __slots__ = ("blob", "keyid", "payload_type")

    def __init__(self, payload_type: str, keyid: str, blob: bytes) -> None:
        self.payload_type = payload_type
        self.keyid = keyid
        self.blob = blob

    def __reduce__(self) -> tuple[type[Sealed], tuple[str, str, bytes]]:
        return type(self), (self.payload_type, self.keyid, self.blob)

    @property
    def payload(self) -> bytes:
        return self.blob[_SIG:]

    def envelope(self) -> Envelope:
        blob = self.blob
        return Envelope(self.payload_type, self.payload, (Signature(self.keyid, blob[:_SIG]),))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sealed):
            return NotImplemented
        a, b = type(self), type(other)
        if a is _Whole or b is _Whole:
            return self.envelope() == other.envelope()
        if self.keyid != other.keyid or self.payload_type != other.payload_type:
            return False
        if a is b and self.blob == other.blob:  # one form, the same bytes
            return True
        if a is Sealed and b is Sealed:
            return False
        # a form each, or two compressed blobs that differ (another zlib build may
        # compress alike payloads otherwise): the signatures, then the payloads
        return self.blob[:_SIG] == other.blob[:_SIG] and self.payload == other.payload

    def __hash__(self) -> int:
        return hash(self.blob[:_SIG])  # the same in either form (equal envelopes: equal sig)


class Packed(Sealed):
    """A record or status envelope whose blob is the signature then its payload
    compressed with the payload type's dictionary (:data:`DICTIONARIES`); no more memory
    per object than :class:`Sealed`.  :attr:`payload` decompresses on each use: callers
    that read it often keep what they parse (the entry's cache, the ranking cache).

    Only blobs :func:`seal` compressed (here, or in a verification worker; or a
    snapshot this resolver wrote and whose MAC checked) are ever decompressed, and
    decompression stops at :data:`_MAX_PAYLOAD` bytes whatever the blob holds."""

    __slots__ = ()

    @property
    def payload(self) -> bytes:
        return _inflate(self.payload_type, self.blob)


class _Whole(Sealed):
    """An envelope that does not fit :class:`Sealed` (several signatures, or a signature
    that is not 64 bytes: it will not verify, but is kept as received)."""

    __slots__ = ("whole",)

    def __init__(self, env: Envelope) -> None:
        super().__init__(env.payload_type, env.keyid if env.signatures else "", b"")
        self.whole = env

    def __reduce__(self) -> tuple[type[_Whole], tuple[Envelope]]:  # type: ignore[override]
        return _Whole, (self.whole,)

    @property
    def payload(self) -> bytes:
        return self.whole.payload

    def envelope(self) -> Envelope:
        return self.whole


def seal(env: Envelope, *, payload_type: str | None = None, keyid: str | None = None) -> Sealed:
    """``env`` held compactly (``payload_type``/``keyid``: equal strings to share
    instead); compressed (:class:`Packed`) when it is a record or status whose payload
    gets smaller.  Envelopes are sealed as they arrive, before verification (a watch
    event's status is held pending), so whatever a writer to the index puts there is
    compressed at most once per value and never beyond :data:`_MAX_PAYLOAD` bytes."""
    sigs = env.signatures
    if len(sigs) != 1 or len(sigs[0].sig) != _SIG:
        return _Whole(env)
    pt = env.payload_type if payload_type is None else payload_type
    kid = sigs[0].keyid if keyid is None else keyid
    payload = env.payload
    zdict = DICTIONARIES.get(pt)
    if zdict is not None and len(payload) <= _MAX_PAYLOAD:
        c = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, 8, zlib.Z_DEFAULT_STRATEGY, zdict)
        packed = c.compress(payload) + c.flush()
        if len(packed) < len(payload):
            return Packed(pt, kid, sigs[0].sig + packed)
    return Sealed(pt, kid, sigs[0].sig + payload)


def _inflate(payload_type: str, blob: bytes) -> bytes:
    """The payload of a :class:`Packed` blob; ValueError for a blob that is not one
    (never more than :data:`_MAX_PAYLOAD` bytes are produced)."""
    zdict = DICTIONARIES.get(payload_type)
    if zdict is None:
        raise ValueError(f"no dictionary for payload type {payload_type[:64]!r}")
    d = zlib.decompressobj(_WBITS, zdict)
    try:
        out = d.decompress(memoryview(blob)[_SIG:], _MAX_PAYLOAD + 1)
    except zlib.error as exc:
        raise ValueError(f"a compressed payload that does not decompress: {exc}") from exc
    if not d.eof or d.unconsumed_tail or d.unused_data:
        raise ValueError("a compressed payload that does not end where it should")
    return out


# -- the dictionaries ----------------------------------------------------------------------


def _record_dictionary() -> bytes:
    """Records as a registry signs them (``Record.to_json``: the model's key order,
    compact separators), with generic values: each kind, common accelerators, the usual
    endpoints, every optional field once.  DEFLATE finds the nearest matches cheapest,
    so the most typical record comes last."""
    raw = _keys.public_raw(_keys.private_from_seed(bytes(32)))
    key = _keys.b64url_encode(raw)

    def record(ns: str, kind: str, attrs: Attributes, **more: object) -> bytes:
        return Record(
            cpid=_cpid.derive(ns, kind, raw).to_text(),
            kind=kind,
            public_key=key,
            issuer=ns,
            version=1,
            issued_at=1_760_000_000,
            expires_at=1_762_592_000,
            **more,  # type: ignore[arg-type]
            attributes=attrs,
        ).to_json()

    def acc(vendor: str, model: str, gib: float, count: int = 8) -> Accelerator:
        return Accelerator(vendor=vendor, model=model, memory_gib=gib, count=count)

    https = Endpoint(proto="https", host="node.example.cn", port=443, purpose="inference")
    parts = [
        record(
            "CN.51.CTCC",
            "CLU",
            Attributes(
                cpu=CpuInfo(model="AMD EPYC 9654", cores=192),
                memory_gib=1536.0,
                accelerators=[acc("AMD", "MI300X", 192.0), acc("NVIDIA", "A100", 40.0, 4)],
                storage_tib=100.0,
                network_gbps=400.0,
                price_cny_per_unit_hour=12.5,
            ),
            endpoints=[
                Endpoint(proto="ssh", host="login.example.cn", port=22, purpose="login"),
                Endpoint(proto="grpc", host="api.example.cn", port=8443, purpose="training"),
            ],
            location=Location(
                region="5101", site="DC1", lat=30.6, lon=104.1, pue=1.25, grid_gco2_per_kwh=550.0
            ),
            labels={"zone": "a"},
        ),
        record(
            "CN.11.CUCC",
            "CPU",
            Attributes(cpu=CpuInfo(model="Intel Xeon Platinum 8480+", cores=112), memory_gib=512.0),
            endpoints=[https],
            location=Location(region="11", site="S1"),
        ),
        record(
            "CN.44.CMCC",
            "NPU",
            Attributes(
                cpu=CpuInfo(model="Kunpeng 920", cores=64),
                memory_gib=1024.0,
                accelerators=[acc("Huawei", "Ascend 910B", 64.0), acc("Huawei", "910B", 64.0)],
            ),
            endpoints=[https],
            location=Location(region="4403", site="S2"),
        ),
        record(
            "CN.31.ALIYUN",
            "GPU",
            Attributes(
                cpu=CpuInfo(model="Xeon", cores=64),
                memory_gib=2048.0,
                accelerators=[
                    acc("NVIDIA", "L40S", 48.0, 4),
                    acc("NVIDIA", "H20", 96.0),
                    acc("NVIDIA", "A800", 80.0),
                    acc("NVIDIA", "H200", 141.0),
                    acc("NVIDIA", "H100", 80.0),
                ],
            ),
            endpoints=[https],
            location=Location(region="52", site="DC2"),
        ),
    ]
    return b"".join(parts)


def _status_dictionary() -> bytes:
    """Statuses as the node agent signs them (``Status.to_json``), each state, the
    protocol's L0 metrics (and the agent's claimed units) with typical values; the most
    typical last."""
    raw = _keys.public_raw(_keys.private_from_seed(bytes(32)))

    def status(ns: str, kind: str, state: str, cap: Capacity, metrics: dict[str, float]) -> bytes:
        return Status(
            cpid=_cpid.derive(ns, kind, raw).to_text(),
            seq=1,
            observed_at=1_760_000_000_000,
            state=state,  # type: ignore[arg-type]
            capacity=cap,
            metrics=metrics,
        ).to_json()

    full = {name: 0.0 for name in METRICS}
    full |= {"gpu_util": 37.5, "gpu_mem_used_mib": 40960.0, "gpu_mem_total_mib": 655360.0}
    full |= {"power_w": 2800.0, "power_limit_w": 5600.0, "claimed_units": 0.0}
    parts = [
        status("CN.11.CUCC", "CPU", "down", Capacity(accelerators_free=0), {}),
        status(
            "CN.44.CMCC",
            "NPU",
            "draining",
            Capacity(accelerators_free=0, cpu_free=0, memory_free_gib=0.0),
            {"claimed_units": 8.0},
        ),
        status(
            "CN.31.ALIYUN",
            "GPU",
            "up",
            Capacity(accelerators_free=8, cpu_free=64, memory_free_gib=512.0),
            full,
        ),
        status(
            "CN.32.CMCC", "GPU", "up", Capacity(accelerators_free=4, cpu_free=32), {"gpu_util": 0.5}
        ),
    ]
    return b"".join(parts)


DICTIONARIES: Final[Mapping[str, bytes]] = {
    Record.media_type(): _record_dictionary(),
    Status.media_type(): _status_dictionary(),
}
"""The preset dictionary of each payload type kept compressed."""


def _digest() -> str:
    h = hashlib.sha256()
    for pt in sorted(DICTIONARIES):
        for part in (pt.encode(), DICTIONARIES[pt]):
            h.update(len(part).to_bytes(4, "big") + part)
    return h.hexdigest()


DICTIONARIES_DIGEST: Final = _digest()
"""SHA-256 over the dictionaries (and zlib's settings are fixed here): a snapshot of
compressed blobs is only read back with the same."""

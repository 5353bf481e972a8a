"""Envelope verifications per second against raw Ed25519 verifications of the same bytes.

    python bench/verify.py [--n 2000] [--rounds 7]

"envelope" = what the resolver does once per record revision: parse the envelope JSON,
decode base64, build PAE, verify the Ed25519 signature, parse the record payload into
its model.  "raw" = one Ed25519 verify of the identical PAE bytes and signature, by
cryptography (OpenSSL) or by PyNaCl (libsodium).

``schemas.keys.verify_raw`` is libsodium's verdict alone (docs/verification.md), so the
envelope path is measured once.  Ratios printed:

* envelope / raw OpenSSL -- the target (>= 0.7): the envelope path as the resolver runs
  it against the raw verify it started from;
* envelope / raw libsodium -- the overhead around the primitive it uses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import interleaved
from registry import ca
from schemas import cpid, dsse, keys
from schemas.models import (
    Accelerator,
    Attributes,
    CpuInfo,
    Endpoint,
    Location,
    Record,
    parse_payload,
)


def sample_envelope() -> tuple[bytes, keys.Ed25519PrivateKey]:
    registry_key, node = keys.generate(), keys.generate()
    now = int(time.time())
    rec = Record(
        cpid=str(cpid.derive("CN.31.CMCC", "GPU", keys.public_raw(node))),
        kind="GPU",
        public_key=keys.public_to_b64url(node),
        issuer="CN.31.CMCC",
        version=3,
        issued_at=now,
        expires_at=now + 86400,
        endpoints=[
            Endpoint(proto="https", host="gpu-17.sh.example.net", port=443, purpose="inference")
        ],
        location=Location(region="31", site="LG01", lat=31.23, lon=121.47),
        attributes=Attributes(
            cpu=CpuInfo(model="Intel Xeon Platinum 8480+", cores=112),
            memory_gib=2048.0,
            accelerators=[Accelerator(vendor="NVIDIA", model="H100", memory_gib=80.0, count=8)],
            network_gbps=400.0,
        ),
        labels={"tier": "gold", "owner": "cmcc"},
    )
    return ca.sign_document(rec, registry_key).to_json(), registry_key


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=2000, help="operations per sample")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median is reported)")
    args = ap.parse_args()

    wire, key = sample_envelope()
    pub = key.public_key()
    trusted = {keys.kid_of(pub): pub}
    env0 = dsse.Envelope.from_json(wire)
    message, sig = dsse.pae(env0.payload_type, env0.payload), env0.signatures[0].sig

    def envelope() -> None:
        env = dsse.Envelope.from_json(wire)
        v = dsse.verify(env, trusted, payload_types=(Record.media_type(),))
        parse_payload(v.payload_type, v.payload, Record)

    def raw() -> None:
        pub.verify(sig, message)

    import nacl.signing

    nacl_key = nacl.signing.VerifyKey(keys.public_raw(pub))
    cases = {
        "raw ed25519 (OpenSSL)": raw,
        "raw ed25519 (libsodium)": lambda: nacl_key.verify(message, sig),
        "envelope verify + parse (libsodium)": envelope,
    }

    rates = interleaved(cases, args.n, args.rounds)
    base = rates["raw ed25519 (OpenSSL)"]
    print(
        f"record envelope: {len(wire)} bytes; {args.rounds} interleaved rounds of {args.n}; "
        f"verify backend {keys.VERIFY_BACKEND}"
    )
    for name, r in rates.items():
        print(f"  {name:<40} {r:>10,.0f} /s   {r / base:5.2f} x raw OpenSSL")
    env_rate = rates["envelope verify + parse (libsodium)"]
    print(f"envelope (libsodium) / raw OpenSSL:    {env_rate / base:.2f}   (target >= 0.7)")
    print(
        f"envelope (libsodium) / raw libsodium:  {env_rate / rates['raw ed25519 (libsodium)']:.2f}"
    )


if __name__ == "__main__":
    main()

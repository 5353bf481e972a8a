#!/usr/bin/env python3
"""Register a few nodes through the registry's HTTP API, as an outside client would.

    python examples/register_nodes.py --up .cpi/up.json [--count 3] [--namespace CN.31.CMCC]
                                      [--keys DIR] [--deregister]

Everything a client needs is spelled out here with the standard library and
``cryptography`` only: Ed25519 keys, the ``register.v1`` payload, the DSSE signature
over PAE, the HTTP call with the join token.  Endpoints, join tokens and the trust
anchor come from the ``up.json`` that ``cpi up`` writes (docs/protocol.md §8), and so
does the CA every registry's TLS certificate is checked against (``tls.ca``); plain
``http://`` registries are refused unless ``--insecure`` is given.  The
answers are then verified against the anchor with ``schemas.chain`` -- the same
offline check any auditor makes -- so a registry that signed the wrong thing, or
with a key outside its delegation, is caught.

Each node's key is kept in ``DIR/node-<n>.pem`` (0600; ``--keys DIR``, by default
``example-nodes/`` beside the up.json), so no record is orphaned: a second run gets the
same CPIDs back (200 instead of 201), and ``--deregister`` removes them again -- at the
end, or on Ctrl-C / SIGTERM for the nodes registered so far.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from schemas import chain, dsse  # noqa: E402  (verification only)

REGISTER_TYPE = "application/vnd.cpi.register.v1+json"
DEREGISTER_TYPE = "application/vnd.cpi.deregister.v1+json"
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

INVENTORY = [("H100", 80.0, 8), ("910B", 64.0, 8), ("A800", 80.0, 4), ("L20", 45.0, 2)]


# -- keys and signing (what a client implements) ----------------------------------


def load_or_create_key(path: Path | None) -> Ed25519PrivateKey:
    """A node key, kept in ``path`` (PKCS#8 PEM, 0600) when given."""
    if path is not None and path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, Ed25519PrivateKey), f"{path}: not an Ed25519 key"
        return key
    key = Ed25519PrivateKey.generate()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
    return key


def public_b64url(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def kid(key: Ed25519PrivateKey) -> str:
    """First 16 Crockford base32 characters of sha256(raw public key)."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    value = int.from_bytes(hashlib.sha256(raw).digest(), "big")
    return "".join(CROCKFORD[(value >> (256 - 5 * (i + 1))) & 31] for i in range(16))


def sign_envelope(payload_type: str, payload: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """A DSSE envelope: the signature covers PAE(type, payload bytes)."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    t = payload_type.encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(t), t, len(body), body)
    env = {
        "payloadType": payload_type,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": kid(key), "sig": base64.b64encode(key.sign(pae)).decode()}],
    }
    return json.dumps(env).encode()


# -- HTTP -------------------------------------------------------------------------


def call(
    method: str,
    url: str,
    body: bytes,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any]]:
    """One JSON request; retries 429 and 503 a few times, honouring Retry-After."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    for attempt in range(6):
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as resp:
                data = resp.read()
                return resp.status, json.loads(data) if data else {}
        except urllib.error.HTTPError as err:
            data = err.read()
            if err.code in (429, 503) and attempt < 5:
                wait = float(err.headers.get("Retry-After") or 2**attempt * 0.2)
                print(f"  {err.code} from the registry; retrying in {wait:g} s", file=sys.stderr)
                time.sleep(wait)
                continue
            try:
                return err.code, json.loads(data)
            except ValueError:
                return err.code, {
                    "error": {"code": f"http_{err.code}", "message": data[:200].decode()}
                }
        except (urllib.error.URLError, OSError) as err:  # refused, DNS, timeout
            reason = getattr(err, "reason", err)
            return 0, {"error": {"code": "unreachable", "message": f"{url}: {reason}"}}
    raise AssertionError("unreachable")


def region_of(namespace: str) -> str:
    codes = [s for s in namespace.split(".")[1:] if re.fullmatch(r"\d{2}(\d{2}){0,2}", s)]
    return codes[-1] if codes else "11"


# -- main -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--up", required=True, help="up.json written by `cpi up`")
    ap.add_argument("--namespace", action="append", help="namespace(s) to use (default: all)")
    ap.add_argument("--count", type=int, default=3, help="number of nodes (default: 3)")
    ap.add_argument(
        "--keys", help="keep node keys in this directory (default: example-nodes/ beside --up)"
    )
    ap.add_argument(
        "--deregister",
        action="store_true",
        help="remove the nodes again at the end (or on Ctrl-C / SIGTERM)",
    )
    ap.add_argument("--insecure", action="store_true", help="allow plain http:// registries")
    args = ap.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupted)  # deregister (with --deregister), then exit

    up_path = Path(args.up)
    try:
        up = json.loads(up_path.read_text())
    except (OSError, ValueError) as exc:
        print(f"{up_path}: cannot read up.json ({exc}); is `cpi up` running?", file=sys.stderr)
        return 2
    keys_dir = Path(args.keys) if args.keys else up_path.parent / "example-nodes"
    anchor_path = Path(up["anchor"])
    if not anchor_path.is_absolute():
        anchor_path = up_path.parent / anchor_path
    anchors = chain.TrustAnchors.from_json(anchor_path.read_bytes())
    ca = (up.get("tls") or {}).get("ca")
    # verify every registry's certificate against the CA of `cpi up` (system roots without)
    context = ssl.create_default_context(cafile=str(up_path.parent / ca) if ca else None)
    plain = sorted({u for u in up.get("registries", {}).values() if u.startswith("http://")})
    if plain and not args.insecure:
        print(f"refusing plain HTTP registries {', '.join(plain)}: use https or --insecure")
        return 2
    if plain:
        print(f"WARNING: --insecure: talking to {', '.join(plain)} without TLS", file=sys.stderr)
    usable = sorted(set(up.get("registries", {})) & set(up.get("tokens", {})))
    namespaces = args.namespace or usable
    missing = [ns for ns in namespaces if ns not in usable]
    if missing or not namespaces:
        print(f"no registry URL and token in {up_path} for: {missing or 'any namespace'}")
        return 2

    registered: list[tuple[str, str, Ed25519PrivateKey]] = []
    try:
        failures = register_all(args, up, namespaces, anchors, keys_dir, registered, context)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        failures = 1
    finally:
        if args.deregister:
            failures += deregister_all(registered, context)
        elif registered:
            print(
                f"keys kept in {keys_dir}; run again with --deregister to remove the nodes",
                file=sys.stderr,
            )
    return 1 if failures else 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def register_all(
    args: argparse.Namespace,
    up: dict[str, Any],
    namespaces: list[str],
    anchors: chain.TrustAnchors,
    keys_dir: Path,
    registered: list[tuple[str, str, Ed25519PrivateKey]],
    context: ssl.SSLContext | None = None,
) -> int:
    failures = 0
    for n in range(args.count):
        ns = namespaces[n % len(namespaces)]
        url, token = up["registries"][ns].rstrip("/"), up["tokens"][ns]
        key = load_or_create_key(keys_dir / f"node-{n}.pem")
        model, mem, count = INVENTORY[n % len(INVENTORY)]
        kind = "NPU" if model == "910B" else "GPU"
        payload = {
            "type": "register.v1",
            "namespace": ns,
            "kind": kind,
            "public_key": public_b64url(key),
            "nonce": secrets.token_urlsafe(16),
            "timestamp": int(time.time()),
            "endpoints": [
                {"proto": "http", "host": f"10.99.0.{n + 1}", "port": 8000, "purpose": "inference"}
            ],
            "location": {"region": region_of(ns)},
            "attributes": {
                "cpu": {"model": "Intel(R) Xeon(R) Platinum 8480+", "cores": 112},
                "memory_gib": 2048.0,
                "accelerators": [
                    {
                        "vendor": "Huawei" if kind == "NPU" else "NVIDIA",
                        "model": model,
                        "memory_gib": mem,
                        "count": count,
                    }
                ],
            },
            "labels": {"example": "register-nodes"},
        }
        status, answer = call(
            "POST",
            f"{url}/v1/registrations",
            sign_envelope(REGISTER_TYPE, payload, key),
            token,
            context,
        )
        if status not in (200, 201):
            err = answer.get("error", {})
            print(
                f"node {n} ({ns}): refused, HTTP {status} {err.get('code')}: {err.get('message')}"
            )
            failures += 1
            continue
        record = dsse.Envelope.from_dict(answer["record"])
        certs = [dsse.Envelope.from_dict(c) for c in answer["chain"]]
        result = chain.verify_record(record, certs, anchors=anchors)
        ours = result.record is not None and result.record.public_key == payload["public_key"]
        verdict = (
            "verified" if result.ok and ours else f"NOT VERIFIED: {result.reason or 'not our key'}"
        )
        print(
            f"{answer['cpid']:<36} {'new' if status == 201 else 'known':<5} "
            f"{count} x {model:<5} {verdict}"
        )
        failures += not (result.ok and ours)
        registered.append((answer["cpid"], url, key))
    return failures


def deregister_all(
    registered: list[tuple[str, str, Ed25519PrivateKey]], context: ssl.SSLContext | None = None
) -> int:
    failures = 0
    for cpid, url, key in registered:
        body = sign_envelope(
            DEREGISTER_TYPE,
            {
                "type": "deregister.v1",
                "cpid": cpid,
                "nonce": secrets.token_urlsafe(16),
                "timestamp": int(time.time()),
            },
            key,
        )
        status, _ = call("DELETE", f"{url}/v1/resources/{cpid}", body, context=context)
        print(f"{cpid:<36} deregistered (HTTP {status})")
        failures += status != 204
    return failures


if __name__ == "__main__":
    raise SystemExit(main())

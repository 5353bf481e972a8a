"""``cpi verify``: verify a signed record bundle or cert chain offline against anchors."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from cpi.commands._util import read_input
from cpi.output import is_json, output_arguments, print_json
from schemas import _json, chain, dsse
from schemas.errors import EnvelopeError, KeyFileError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify",
        help="verify a record bundle or cert chain against a trust anchor",
        description=(
            'ENVELOPE is a JSON file: a bundle {"record": <envelope>, "chain": [<cert>...]} as the '
            'resolver serves it, {"chain": [...]}, or a single cert.v1 envelope issued by an anchor. '
            "Exit 0 when valid, 1 with the failing rule when not."
        ),
    )
    p.add_argument("envelope", help="file to verify ('-' for stdin)")
    p.add_argument("--anchor", required=True, action="append", help="anchor file (repeatable)")
    endorsement_argument(p)
    p.add_argument("--revoked", help="JSON list of revocation.v1 envelopes to honour")
    p.add_argument("--now", type=int, help="verify as of this Unix time (default: now)")
    output_arguments(p)
    p.set_defaults(handler=run)


def endorsement_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endorsement",
        action="append",
        default=[],
        metavar="FILE",
        help="endorsement.v1 envelope (or a JSON list of them) by an --anchor root, vouching "
        "for another root's anchor; records of that root then verify (repeatable)",
    )


def with_endorsements(
    anchors: chain.TrustAnchors, paths: list[str], now: int
) -> chain.TrustAnchors:
    """``anchors`` plus the roots the endorsement files vouch for (docs/protocol.md §10).

    An endorsement that does not verify against ``anchors`` at ``now`` is an error
    (ChainError, exit 1), not ignored: the user asked for it."""
    envelopes: list[dsse.Envelope] = []
    for path in paths:
        try:
            obj = _json.loads(read_input(path))
        except ValueError as exc:
            raise EnvelopeError(f"{path}: endorsement file is not JSON: {exc}") from exc
        for item in obj if isinstance(obj, list) else [obj]:
            envelopes.append(dsse.Envelope.from_dict(item))
    return chain.endorsed_anchors(anchors, envelopes, now=now) if envelopes else anchors


def _anchors(paths: list[str]) -> chain.TrustAnchors:
    items: list[Any] = []
    for path in paths:
        try:
            obj = _json.loads(read_input(path))
        except ValueError as exc:
            raise KeyFileError(f"{path}: anchor file is not JSON: {exc}") from exc
        items.extend(obj if isinstance(obj, list) else [obj])
    return chain.TrustAnchors.from_json(json.dumps(items))


def _revocations(path: str | None) -> dict[str, dsse.Envelope]:
    if not path:
        return {}
    from schemas.models import Revocation, parse_payload

    out = {}
    for obj in _json.loads(read_input(path)):
        env = dsse.Envelope.from_dict(obj)
        rev = parse_payload(env.payload_type, env.payload, Revocation)  # index by target only
        out[rev.target] = env
    return out


def run(args: argparse.Namespace) -> int:
    raw = read_input(args.envelope)
    try:
        doc = _json.loads(raw)
    except ValueError as exc:
        raise EnvelopeError(f"{args.envelope}: not valid JSON: {exc}") from exc
    now = args.now if args.now is not None else int(time.time())
    anchors = with_endorsements(_anchors(args.anchor), args.endorsement, now)
    opts: dict[str, Any] = {
        "anchors": anchors,
        "revocations": _revocations(args.revoked),
        "now": now,
    }
    if isinstance(doc, dict) and "payloadType" in doc:
        result = chain.verify_chain([dsse.Envelope.from_dict(doc)], **opts)
    elif isinstance(doc, dict) and "chain" in doc:
        certs = [dsse.Envelope.from_dict(c) for c in doc["chain"]]
        if "record" in doc:
            result = chain.verify_record(dsse.Envelope.from_dict(doc["record"]), certs, **opts)
        else:
            result = chain.verify_chain(certs, **opts)
    else:
        raise EnvelopeError(f"{args.envelope}: expected an envelope or a {{record, chain}} bundle")
    if is_json(args):
        print_json(result.to_dict())
    else:
        for c in result.checks:
            mark = "ok  " if c.ok else "FAIL"
            print(
                f"{mark} rule {c.rule} link {c.link}: {c.what}"
                + (f": {c.detail}" if c.detail else "")
            )
        print("valid" if result.ok else f"invalid: {result.reason}")
    return 0 if result.ok else 1

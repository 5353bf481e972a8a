"""``cpi endorse sign|publish|withdraw``: one root vouching for another (docs/protocol.md §10).

* ``sign`` makes an ``endorsement.v1`` envelope with the issuing root's key (offline);
* ``publish`` verifies it against the issuer's anchor and writes it to the issuer's index
  at ``/cpi/v1/endorse/<subject>``, where federated resolvers follow it;
* ``withdraw`` deletes that key: resolvers stop serving the endorsed root at once.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time

from cpi.commands._etcd import etcd_argument, open_index
from cpi.commands._util import read_input
from cpi.output import print_json
from registry import ca, keyfile
from resolver.federation import endorse_key
from schemas import _json, chain, dsse, keys
from schemas.cpid import parse_namespace
from schemas.endorsement import MAX_WINDOW_S, Endorsement
from schemas.errors import EnvelopeError, InvalidDataError, KeyFileError
from schemas.models import Anchor


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "endorse",
        help="endorse another root's anchor (sign, publish, withdraw)",
        description="Root A vouches for root B's anchor key, for B's namespaces only "
        "(docs/protocol.md §10).",
    )
    acts = p.add_subparsers(dest="endorse_command", metavar="ACTION", required=True)
    s = acts.add_parser("sign", help="sign an endorsement.v1 with the issuing root's key")
    s.add_argument("--key", required=True, help="the issuing root's private key (0600)")
    s.add_argument("--issuer", required=True, help="the issuing root, e.g. CN")
    s.add_argument(
        "--subject-anchor", required=True, help="anchor file of the endorsed root (anchor.v1)"
    )
    s.add_argument(
        "--permitted",
        action="append",
        default=[],
        metavar="NS",
        help="a namespace the endorsed root may speak for (repeatable; default: its root)",
    )
    s.add_argument("--days", type=float, default=30.0, help="validity in days (default 30)")
    s.add_argument("--serial", help="serial (default: random)")
    s.set_defaults(handler=run_sign)

    pub = acts.add_parser("publish", help="verify an endorsement and write it to the index")
    pub.add_argument("file", help="endorsement envelope file ('-' for stdin)")
    pub.add_argument("--anchor", required=True, help="the issuing root's anchor file")
    etcd_argument(pub)
    pub.set_defaults(handler=run_publish)

    w = acts.add_parser("withdraw", help="delete the endorsement of a root from the index")
    w.add_argument("root", help="the endorsed root, e.g. SG")
    etcd_argument(w)
    w.set_defaults(handler=run_withdraw)


def run_sign(args: argparse.Namespace) -> int:
    key = keyfile.load_private(args.key)
    try:
        anchor = Anchor.model_validate(_json.loads(read_input(args.subject_anchor)))
    except ValueError as exc:
        raise KeyFileError(f"{args.subject_anchor}: not an anchor.v1 file: {exc}") from exc
    if not 0 < args.days * 86_400 <= MAX_WINDOW_S:
        raise InvalidDataError(f"--days {args.days}: must be above 0 and at most 366")
    now = int(time.time())
    try:
        doc = Endorsement(
            issuer=parse_namespace(args.issuer),
            subject=anchor.subject,
            public_key=anchor.public_key,
            permitted=args.permitted or [anchor.subject],
            serial=args.serial or secrets.token_hex(8),
            not_before=now - 60,
            not_after=now - 60 + int(args.days * 86_400),
        )
    except ValueError as exc:
        raise InvalidDataError(f"endorsement: {exc}") from exc
    print_json(ca.sign_document(doc, key).to_dict())
    return 0


def _load(path: str) -> dsse.Envelope:
    try:
        return dsse.Envelope.from_dict(_json.loads(read_input(path)))
    except ValueError as exc:
        raise EnvelopeError(f"{path}: not an envelope: {exc}") from exc


def run_publish(args: argparse.Namespace) -> int:
    env = _load(args.file)
    anchors = chain.TrustAnchors([Anchor.model_validate(_json.loads(read_input(args.anchor)))])
    doc = chain.verify_endorsement(env, anchors=anchors)  # never publish what would be refused

    async def put() -> int:
        async with open_index(args.etcd, args=args) as index:
            return await index.put(endorse_key(doc.subject), env.to_json())

    revision = asyncio.run(put())
    print_json(
        {
            "key": endorse_key(doc.subject),
            "issuer": doc.issuer,
            "subject": doc.subject,
            "kid": keys.kid(keys.b64url_decode(doc.public_key)),
            "not_after": doc.not_after,
            "revision": revision,
        }
    )
    return 0


def run_withdraw(args: argparse.Namespace) -> int:
    key = endorse_key(args.root)

    async def delete() -> bool:
        async with open_index(args.etcd, args=args) as index:
            return await index.delete(key)

    print_json({"key": key, "deleted": asyncio.run(delete())})
    return 0

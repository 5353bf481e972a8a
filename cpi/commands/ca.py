"""``cpi ca init|delegate|revoke``: the national root, delegation certs, revocations."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from cpi.commands._etcd import credential_arguments, etcd_argument, open_index
from cpi.errors import UsageError
from cpi.output import emit, is_json, output_arguments, print_fields, print_json, when
from registry import keyfile, national
from schemas import dsse, keys
from schemas.models import Cert, parse_payload


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ca", help="national node: root key and anchor, delegation certs, revocations"
    )
    cas = p.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    init = cas.add_parser("init", help="create the root key (0600) and its anchor file")
    init.add_argument("--root", default="CN", help="root prefix, an ISO 3166-1 code (default: CN)")
    init.add_argument("--out", required=True, help="directory for root.key and anchor.json")
    output_arguments(init)
    init.set_defaults(handler=run_init)

    dele = cas.add_parser(
        "delegate",
        help="sign a cert.v1 delegating a namespace to a key",
        description=(
            "Sign a cert.v1 for SUBJECT (at or below ISSUER) and PUBKEY. Works from the root "
            "(CN -> CN.31) and from a delegated namespace (CN.31 -> CN.31.CMCC with CN.31's key). "
            "When the issuer's own cert is known (--issuer-cert, or looked up with --etcd) it "
            "must hold scope 'delegate'."
        ),
    )
    dele.add_argument("--subject", required=True, help="namespace to delegate, e.g. CN.31")
    dele.add_argument(
        "--scopes", required=True, help="comma-separated: delegate, issue (e.g. delegate,issue)"
    )
    dele.add_argument(
        "--pubkey", required=True, help="subject's public key (PEM, base64url, or a key file)"
    )
    dele.add_argument("--days", type=float, default=365, help="validity in days (default: 365)")
    dele.add_argument("--issuer-key", required=True, help="issuer's private key file")
    dele.add_argument("--issuer", required=True, help="issuer's namespace, e.g. CN")
    dele.add_argument("--issuer-cert", help="issuer's own cert.v1 file (checked for 'delegate')")
    dele.add_argument(
        "--etcd",
        help="look the issuer's cert up in this index when --issuer-cert is not given",
    )
    credential_arguments(dele)
    dele.add_argument("--out", help="write the cert here (default: stdout)")
    output_arguments(dele)
    dele.set_defaults(handler=run_delegate)

    rev = cas.add_parser(
        "revoke",
        help="sign a revocation.v1 and publish it under /cpi/v1/revoked/",
        description=(
            "Revoke a cert (by --serial or by the --kid of the key it certifies) or a node key "
            "(--kid). The issuer key must be the revoked cert's issuer or an ancestor; when the "
            "cert is in the index this is checked before publishing."
        ),
    )
    rev.add_argument("--issuer-key", required=True, help="revoking key (issuer or an ancestor)")
    rev.add_argument(
        "--subject", required=True, help="namespace of the revoked cert (or of the node)"
    )
    which = rev.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="serial of the cert to revoke")
    which.add_argument("--kid", help="key id of the key to revoke")
    rev.add_argument("--reason", required=True, help="why, e.g. 'key compromise'")
    etcd_argument(rev)
    output_arguments(rev)
    rev.set_defaults(handler=run_revoke)


def run_init(args: argparse.Namespace) -> int:
    _, anchor = national.init_root(args.out, args.root, exclusive=True)
    out = Path(args.out)
    info = {
        "root": anchor.subject,
        "kid": anchor.kid,
        "key_file": str(out / national.ROOT_KEY_FILE),
        "anchor_file": str(out / national.ANCHOR_FILE),
    }
    emit(
        args,
        info,
        table=lambda wide: print_fields(
            [
                ("root", f"{anchor.subject}  kid {anchor.kid}"),
                ("key", f"{info['key_file']} (0600; keep it offline)"),
                ("anchor", f"{info['anchor_file']} (give it to every verifier)"),
            ]
        ),
    )
    return 0


async def _issuer_cert_from_index(
    urls: str, kid: str, args: argparse.Namespace
) -> dsse.Envelope | None:
    async with open_index(urls, args=args) as index:
        return await national.get_cert(index, kid)


def run_delegate(args: argparse.Namespace) -> int:
    issuer_key = keyfile.load_private(args.issuer_key)
    pub = keyfile.load_public(args.pubkey)
    issuer_cert = national.read_cert(args.issuer_cert) if args.issuer_cert else None
    if issuer_cert is None and args.etcd:
        issuer_cert = asyncio.run(_issuer_cert_from_index(args.etcd, keys.kid_of(issuer_key), args))
    env = national.delegate(
        issuer_key=issuer_key,
        issuer=args.issuer,
        subject=args.subject,
        public_key=pub,
        scopes=args.scopes.split(","),
        days=args.days,
        issuer_cert=issuer_cert,
    )
    text = json.dumps(env.to_dict(), indent=2) + "\n"
    cert = parse_payload(env.payload_type, env.payload, Cert)
    summary = (
        f"delegated {cert.subject} to key {keys.kid_of(pub)} (scopes {','.join(cert.scopes)}, "
        f"serial {cert.serial}, valid until {when(cert.not_after)}), signed by {cert.issuer}"
    )
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:
            raise UsageError(f"--out {args.out}: {exc.strerror}") from exc
    if is_json(args):
        print_json(
            {
                "subject": cert.subject,
                "issuer": cert.issuer,
                "kid": keys.kid_of(pub),
                "scopes": list(cert.scopes),
                "serial": cert.serial,
                "not_after": cert.not_after,
                "out": args.out,
                "cert": env.to_dict(),
            }
        )
    elif args.out:
        print(f"{summary}\nwrote {args.out}")
    else:
        sys.stdout.write(text)
        print(summary, file=sys.stderr)
    return 0


async def _revoke(args: argparse.Namespace) -> int:
    issuer_key = keyfile.load_private(args.issuer_key)
    async with open_index(args.etcd, args=args) as index:
        env, created = await national.revoke(
            index,
            issuer_key=issuer_key,
            subject=args.subject,
            serial=args.serial,
            kid=args.kid,
            reason=args.reason,
        )
    target = args.serial or args.kid
    info = {"target": target, "subject": args.subject, "created": created, "keyid": env.keyid}

    def table(wide: bool) -> None:
        if created:
            print(f"revoked {target} ({args.subject}); published by key {env.keyid}")
        else:
            print(f"{target} was already revoked (by key {env.keyid}); left as it was")

    emit(args, info, table=table)
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    return asyncio.run(_revoke(args))

"""``cpi keygen``: create an Ed25519 key file (mode 0600)."""

from __future__ import annotations

import argparse

from cpi.output import emit, output_arguments, print_fields
from registry import keyfile
from schemas import keys


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keygen", help="create an Ed25519 private key file (mode 0600)")
    p.add_argument("--out", required=True, help="private key file to create (PKCS#8 PEM)")
    p.add_argument("--pub", help="also write the public key (PEM) here")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    output_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    key = keys.generate()
    keyfile.write_private(args.out, key, overwrite=args.force)
    if args.pub:
        keyfile.write_public(args.pub, key)
    info = {
        "key_file": args.out,
        "public_key_file": args.pub,
        "kid": keys.kid_of(key),
        "public_key": keys.public_to_b64url(key),
    }

    def table(wide: bool) -> None:
        print(f"wrote {args.out} (0600)")
        print_fields([("kid", info["kid"]), ("public_key", info["public_key"])])

    emit(args, info, table=table)
    return 0

"""Quick start of the Python client (docs/client.md): find GPUs, look one up, verify
it against your trust anchor, and claim a unit of it for a minute.

Run it against any resolver (``make up`` starts one on port 8700)::

    export CPI_RESOLVER=http://127.0.0.1:8700
    python examples/client_quickstart.py --anchor .cpi/national/anchor.json
    CPI_CLAIMS_TOKEN=cpi_ct_... python examples/client_quickstart.py --claim 1

Exit codes: 0 done; 1 nothing found or the record did not verify; 2 the resolver is
not ready or cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resolver.client import SyncResolverClient, default_url
from resolver.config import load_anchor_files
from resolver.errors import ResolverUnavailableError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolver", default=default_url(), help="resolver base URL")
    parser.add_argument("--kind", default="GPU", help="CPID kind to look for (GPU)")
    parser.add_argument("--accelerator", help="accelerator model, e.g. H100")
    parser.add_argument("--anchor", type=Path, help="trust anchor file: verify the record offline")
    parser.add_argument(
        "--claim", type=int, metavar="UNITS", help="claim UNITS of the best hit, then release"
    )
    args = parser.parse_args(argv)

    try:
        with SyncResolverClient(args.resolver) as client:  # $CPI_CLAIMS_TOKEN for claims
            if not client.ready().get("ready"):
                print(f"{args.resolver} is not ready yet (first listing, or etcd down)")
                return 2

            # 1. discovery: typed hits, best first
            hits = client.find(kind=args.kind, accelerator=args.accelerator, live=True, limit=5)
            print(f"{len(hits)} live {args.kind} resources at revision {hits.revision}:")
            for hit in hits:
                models = ", ".join(f"{n}x {m}" for m, n in hit.accelerators) or "-"
                print(f"  {hit.cpid}  score {hit.score:.3f}  free {hit.free}  {models}")
            if not hits:
                return 1

            # 2. lookup: the signed record, its chain and the latest status
            best = client.lookup(hits.hits[0].cpid)
            print(f"{best.cpid}: {best.kind} issued by {best.issuer}, version {best.version}")
            print(f"  live {best.live}, state {best.state}, free {best.free}")

            # 3. verify offline: trust only the anchor, not the resolver
            if args.anchor is not None:
                result = best.verify(load_anchor_files([args.anchor]))
                if not result.ok:
                    print(f"  offline verification FAILED: {result.failure}")
                    return 1
                print("  offline verification: OK")

            # 4. claim units (atomic, leased), then give them back
            if args.claim:
                claim = client.claim(cpid=best.cpid, units=args.claim, ttl_s=60)
                print(f"  claimed {claim.units} units: {claim.claim_id}, until {claim.expires_at}")
                held = client.holdings()
                print(f"  holder {held.holder} holds {held.units} units in {len(held)} claims")
                client.release(claim)
                print("  released")
    except ResolverUnavailableError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

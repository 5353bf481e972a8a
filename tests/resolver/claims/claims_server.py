"""A resolver with only the claims routes, for the crash test (run in a subprocess).

``python -m tests.resolver.claims.claims_server ETCD_ENDPOINT ANCHOR_FILE`` starts a
:class:`~resolver.core.Resolver` on that etcd, mounts :func:`add_claim_routes` on a
bare aiohttp app on a free loopback port, prints ``port <n>`` once the replica is
ready, and serves until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from registry.index import Index
from resolver.claims.http import add_claim_routes
from resolver.config import load_anchor_files
from resolver.core import Resolver
from tests.resolver.kit import FAST


async def main(endpoint: str, anchor: str) -> None:
    resolver = Resolver(
        index=Index(endpoints=[endpoint], timeout=3.0),
        anchors=load_anchor_files([Path(anchor)]),
        settings=FAST,
        own_index=True,
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await resolver.start()
        async with asyncio.timeout(20):
            await resolver.wait_ready()
        yield
        await resolver.close()

    app = web.Application()
    app.cleanup_ctx.append(lifecycle)
    add_claim_routes(app, resolver=resolver)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    print(f"port {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))

"""A registry and a resolver on real loopback ports, run in a thread of their own.

schemathesis sends its requests with ``requests`` (blocking) to a base URL; an aiohttp
app is neither ASGI nor WSGI, so :class:`Stack` serves both apps with the real
``AppRunner`` on free ports of 127.0.0.1, in an event loop on a background thread, and
fills them with a little data first: a PKI (the ``World`` of the registry tests), nodes
registered through the registry's own HTTP route with a status each, a signed log
checkpoint, a join token, an admin token and a claims token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from registry.index import Index
from registry.logsigner import LogSigner
from registry.service import create_app as registry_app
from resolver.claims import tokens as claims_tokens
from resolver.http import create_app as resolver_app
from schemas import keys
from schemas.models import Accelerator, Attributes
from tests.registry.service_kit import ADMIN_TOKEN, Node, World, bearer
from tests.resolver.kit import resolver_config

T = TypeVar("T")

ORIGIN = "cpi.test/log"
GPUS = Attributes(accelerators=[Accelerator(vendor="NVIDIA", model="H100", memory_gib=80, count=8)])


@dataclass
class Stack:
    """Both services on one etcd; URLs and tokens once :meth:`start` returns."""

    etcd: str
    tmp: Path
    registry: str = ""
    resolver: str = ""
    join_token: str = ""
    admin_token: str = ADMIN_TOKEN
    claims_token: str = ""
    cpids: list[str] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    """The registered nodes (``doomed`` too): the fuzzer signs their documents."""
    doomed: Node | None = None
    """A registered node the fuzzer may deregister (the others stay for the resolver)."""
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = None
    _cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-stack")
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._thread is None:
            return
        try:
            self.run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop.close()
            self._thread = None

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        self._cleanup.append(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    async def _start(self) -> None:
        index = Index(endpoints=[self.etcd], timeout=5.0)
        await index.connect()
        self._cleanup.append(index.close)
        await index.delete_everything()
        world = World(self.tmp)
        await world.publish(index)
        self.join_token = await world.token(index)
        self.claims_token = await claims_tokens.create_token(
            index, holder="fuzzer", ttl_s=3600, max_units=4
        )
        # rate limits out of the fuzzer's way (they have their own tests): the fuzzer checks
        # what each request gets, and sends hundreds of unauthenticated ones from one address
        limits_off = {"unauthenticated_per_s": 10_000, "unauthenticated_burst": 10_000}
        self.registry = await self._serve(registry_app(world.config(self.etcd, **limits_off)))
        async with aiohttp.ClientSession() as http:
            for i in range(4):
                node = Node()
                url = f"{self.registry}/v1/registrations"
                body = node.register(attributes=GPUS)
                async with http.post(url, data=body, headers=bearer(self.join_token)) as r:
                    assert r.status == 201, await r.text()
                async with http.put(
                    f"{self.registry}/v1/resources/{node.cpid}/status", data=node.status(free=4)
                ) as r:
                    assert r.status == 204, await r.text()
                self.nodes.append(node)
                if i == 3:
                    self.doomed = node
                else:
                    self.cpids.append(node.cpid)
        signer = LogSigner(index, keys.generate(), origin=ORIGIN)
        await signer.load()
        await signer.sign()
        config = resolver_config(self.etcd, world.anchor_file)
        self.resolver = await self._serve(resolver_app(config))
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                async with http.get(f"{self.resolver}/v1/resources/{self.cpids[-1]}") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the resolver never served the registered nodes")

    async def _stop(self) -> None:
        while self._cleanup:
            await self._cleanup.pop()()

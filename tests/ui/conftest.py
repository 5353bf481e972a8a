"""Browser tests of the console: a resolver over real etcd, driven by headless Chromium.

``stack`` (module): the session etcd with a PKI, a log key, a claims token and a few
records written the way a registry writes them (record, status and audit entry), a
checkpoint signed over them, and the full resolver app (:func:`resolver.http.create_app`)
serving on a free loopback port.  The resolver and the writes run on an asyncio loop
in a background thread, so the tests use Playwright's sync API on the main thread.

``browser`` (module): Debian's ``chromium`` (``CPI_CHROMIUM`` overrides the path).
A missing browser fails the tests: they never skip.  ``page``: a fresh page that
records console errors and uncaught exceptions; the test fails if any appear.

Screenshots go to ``$CPI_UI_SCREENSHOTS`` when set (the README's image comes from
``CPI_UI_SCREENSHOTS=docs/img``), else to the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from cpi.etcdproc import EtcdProcess
from registry.changes import AuditStream
from registry.index import Index, Keys, Op
from registry.logsigner import LogSigner, init_log_key, vkey_path_for
from resolver.claims.tokens import create_token
from resolver.http import create_app
from resolver.ui import ENV_LOG_VKEY
from tests.resolver.kit import Node, Pki, resolver_config, signed

T = TypeVar("T")

ORIGIN = "cpi.test/log"


class Stack:
    """The resolver under test and a handle to write into its etcd."""

    def __init__(self, etcd: EtcdProcess, tmp: Path) -> None:
        self.etcd = etcd
        self.tmp = tmp
        self.pki = Pki()
        self.anchor_path = self.pki.write_anchor(tmp / "anchor.json")
        self.log_key, self.log_verifier, _ = init_log_key(tmp / "log.key", origin=ORIGIN)
        self.vkey = self.log_verifier.to_vkey()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="ui-stack", daemon=True)
        self.thread.start()
        self.index: Index
        self.runner: web.AppRunner
        self.url = ""
        self.claims_token = ""
        self.nodes: list[Node] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    async def _start(self) -> None:
        self.index = Index(endpoints=[self.etcd.endpoint], timeout=5.0)
        await self.index.__aenter__()
        await self.index.delete_everything()
        await self.pki.publish(self.index)
        self.claims_token = await create_token(self.index, holder="alice", ttl_s=3600)
        config = resolver_config(self.etcd.endpoint, self.anchor_path)
        app = create_app(config)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.index.__aexit__(None, None, None)

    def start(self) -> None:
        os.environ[ENV_LOG_VKEY] = str(vkey_path_for(self.tmp / "log.key"))
        try:
            self.call(self._start())
        finally:
            del os.environ[ENV_LOG_VKEY]
        self.wait_ready()

    def stop(self) -> None:
        try:
            self.call(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def wait_ready(self, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the resolver did not get ready")
            time.sleep(0.1)

    # -- writes, as a registry makes them -----------------------------------------------

    def register(self, node: Node, *, free: int = 8, sign_log: bool = True) -> str:
        """Write the node's record (with its audit entry) and status; sign a checkpoint."""

        async def go() -> None:
            env = signed(self.pki, node.record())
            result = await AuditStream(self.index).commit(
                success=[
                    Op.put(Keys.rec(node.cpid), env.to_json()),
                    Op.put(Keys.live(node.cpid), node.status(free=free).to_json()),
                ],
                op="register",
                envelope=env,
                cpid=node.cpid,
                version=1,
            )
            assert result.succeeded
            if sign_log:
                signer = LogSigner(self.index, self.log_key, origin=ORIGIN)
                await signer.load()
                await signer.sign()

        self.call(go())
        self.nodes.append(node)
        return node.cpid

    def deregister(self, node: Node) -> None:
        async def go() -> None:
            await self.index.delete(Keys.live(node.cpid))
            await self.index.delete(Keys.rec(node.cpid))

        self.call(go())

    def put_raw(self, key: str, value: bytes) -> None:
        self.call(self.index.put(key, value))

    def served(self, cpid: str, within: float = 5.0) -> Any:
        """The resolver's bundle for ``cpid`` once its replica has seen the write.

        A write returns when etcd has it; the resolver serves it when the watch has
        delivered it, a few milliseconds later: reading at once may race the watch.
        """
        deadline = time.monotonic() + within
        while True:
            try:
                return self.get(f"/v1/resources/{cpid}")
            except urllib.error.HTTPError as e:
                if e.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(0.02)

    def get(self, path: str, token: str | None = None) -> Any:
        req = urllib.request.Request(f"{self.url}{path}")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(etcd_server, tmp_path_factory.mktemp("ui"))
    s.start()
    try:
        s.register(Node(namespace="CN.31.CMCC", region="31", model="H100"), free=6)
        s.register(Node(namespace="CN.31.CMCC", region="31", model="A800", count=4), free=4)
        s.register(Node(namespace="CN.32", region="32", model="H100", labels={"tier": "silver"}))
        s.register(Node(namespace="CN.3", region="31", kind="CPU", count=0, labels={}), free=0)
        for node in s.nodes:
            s.served(node.cpid)
        yield s
    finally:
        s.stop()


def chromium_path() -> str:
    path = os.environ.get("CPI_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.fail(
            "no chromium found: install Debian's chromium (.ci/run does) or set CPI_CHROMIUM; "
            "the browser tests do not skip"
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield b
        finally:
            b.close()


class Console:
    """Console errors and uncaught exceptions of a page."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.allowed: list[str] = []

    def allow(self, text: str) -> None:
        """An expected error (e.g. a 404 the test provokes) that does not fail the test."""
        self.allowed.append(text)

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def page(browser: Any, stack: Stack, console: Console) -> Iterator[Any]:
    context = browser.new_context(base_url=stack.url)
    pg = context.new_page()
    pg.on("console", lambda m: console.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: console.errors.append(f"uncaught: {e}"))
    try:
        yield pg
        assert console.unexpected() == [], f"console errors: {console.unexpected()}"
    finally:
        context.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    out = Path(os.environ.get("CPI_UI_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out

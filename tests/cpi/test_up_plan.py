"""cpi up's plan for several etcd members, registries and resolvers (nothing started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpi.etcdproc import cluster_members
from cpi.up import MAX_INSTANCES, UpOptions, _etcd_children, _ports, _wanted_ports


def test_port_plan_keeps_the_single_instance_ports_and_never_collides() -> None:
    one = _wanted_ports(UpOptions(data_dir=Path("x"), base_port=20000))
    assert one == {
        "resolver_http": 20000,
        "registry_regional": 20001,
        "registry_industry": 20002,
        "resolver_dns": 20053,
        "etcd_client": 20079,
        "etcd_peer": 20080,
    }
    n = MAX_INSTANCES
    big = _wanted_ports(
        UpOptions(data_dir=Path("x"), base_port=20000, etcd_members=n, registries=n, resolvers=n)
    )
    assert len(set(big.values())) == len(big) == 6 + 6 * (n - 1)
    assert {k: big[k] for k in one} == one
    assert max(big.values()) < 20100


def test_cluster_members_know_every_peer(tmp_path: Path) -> None:
    members = cluster_members(tmp_path, [(0, 0)] * 3, log_dir=tmp_path / "logs")
    assert [m.name for m in members] == ["m0", "m1", "m2"]
    initial = {m.initial_cluster for m in members}
    assert len(initial) == 1
    for m in members:
        assert f"{m.name}={m.peer_url}" in m.initial_cluster
        assert m.log_file == tmp_path / "logs" / f"etcd-{m.name}.log"
        assert m.url.startswith("http://127.0.0.1:")
    assert len({m.client_port for m in members} | {m.peer_port for m in members}) == 6


def test_a_data_dir_is_not_switched_between_one_member_and_a_cluster(tmp_path: Path) -> None:
    data = tmp_path / "state"
    data.mkdir()
    opts = UpOptions(data_dir=data, base_port=21000, etcd_members=3)
    ports = _wanted_ports(opts)  # not _ports: no need for them to be free here
    children, members = _etcd_children(opts, ports, data / "logs")
    assert [c.name for c in children] == ["etcd-m0", "etcd-m1", "etcd-m2"]
    assert children[-1].ready is not None and children[0].ready is None
    assert [m.client_port for m in members] == [21079, 21081, 21083]
    # every member serves https (client and peer URLs) with its own certificate from the
    # local CA and requires client certificates, as the single member does
    for m in members:
        assert m.url.startswith("https://") and m.peer_url.startswith("https://")
        assert m.cert_file == data / "tls" / f"etcd-{m.name}.pem"
        cmd = m.command()
        assert "--client-cert-auth" in cmd and "--peer-client-cert-auth" in cmd
        assert f"{m.name}={m.peer_url}" in m.initial_cluster
    with pytest.raises(SystemExit, match="cluster"):
        _etcd_children(UpOptions(data_dir=data, base_port=21000), ports, data / "logs")
    five = UpOptions(data_dir=data, base_port=21000, etcd_members=5)
    with pytest.raises(SystemExit, match="--etcd-members 3"):
        _etcd_children(five, _wanted_ports(five), data / "logs")
    with pytest.raises(SystemExit, match="must be 1 to"):
        _ports(UpOptions(data_dir=data, resolvers=0))


def test_witness_ports_are_planned_only_when_asked_for() -> None:
    base = _wanted_ports(UpOptions(data_dir=Path("x"), base_port=20000))
    assert not any(k.startswith("witness") for k in base)
    n = MAX_INSTANCES
    big = _wanted_ports(
        UpOptions(
            data_dir=Path("x"),
            base_port=20000,
            etcd_members=n,
            registries=n,
            resolvers=n,
            witnesses=n,
        )
    )
    assert [big[f"witness_{i}"] for i in range(n)] == list(range(20040, 20040 + n))
    assert len(set(big.values())) == len(big) == 6 + 6 * (n - 1) + n


def test_up_json_is_replaced_whole_and_stays_private(tmp_path: Path) -> None:
    """``up.json`` is rewritten whenever a child changes state; a script polling it must
    never read half a file (CI once read an empty one): each write is a new file (0600)
    renamed over the old one, and nothing is left beside it."""
    import json
    import os
    import stat
    import threading

    from cpi.up import _write_private_json

    path = tmp_path / "up.json"
    _write_private_json(path, {"n": 0})
    first = path.open()  # held open: its inode is not reused meanwhile
    seen: list[object] = []
    stop = threading.Event()

    errors: list[Exception] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(json.loads(path.read_text())["n"])
            except ValueError as exc:  # a partial (or empty) file
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    with first:
        try:
            for n in range(1, 300):
                _write_private_json(path, {"n": n, "pad": "x" * 20_000})
        finally:
            stop.set()
            reader.join()
        assert not errors and seen
        assert json.loads(path.read_text())["n"] == 299
        # replaced, not rewritten in place: the file held open is intact
        assert os.fstat(first.fileno()).st_ino != path.stat().st_ino
        assert json.loads(first.read()) == {"n": 0}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["up.json"]

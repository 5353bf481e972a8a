"""The first CLI commands: keygen, id parse/check/derive, verify, demo."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cpi.main import main
from registry import ca, keyfile
from schemas import cpid, keys
from schemas.errors import KeyFileError

EXAMPLE = "CN.31.CMCC/GPU.4K7Q9M2XH3PT-Z"


def test_keygen_writes_0600_and_refuses_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "node.key"
    assert main(["keygen", "--out", str(out), "--pub", str(tmp_path / "node.pub")]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = keyfile.load_private(out)
    assert keys.kid_of(key) in capsys.readouterr().out
    assert keys.public_raw(keyfile.load_public(tmp_path / "node.pub")) == keys.public_raw(key)
    assert main(["keygen", "--out", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_group_readable_key_is_refused(tmp_path: Path) -> None:
    path = keyfile.write_private(tmp_path / "k.key", keys.generate())
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match=r"mode 0640, expected 0600.*chmod 600"):
        keyfile.load_private(path)


def test_id_parse_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", "parse", EXAMPLE.lower(), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpid"] == EXAMPLE
    assert info["segments"] == ["CN", "31", "CMCC"]
    assert (info["kind"], info["serial"], info["check"]) == ("GPU", "4K7Q9M2XH3PT", "Z")
    assert info["dns"] == "4k7q9m2xh3pt-z.gpu.cmcc.31.cn.cpi."


def test_id_parse_text_explains_parts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", "parse", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert re.search(r"segment 2 +31 ", out) and "GPU server" in out and "MOD 37,36" in out


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("CN.31.CMCC/GPU.4K7Q9M2XH3PT-Y", "check character is 'Y', expected 'Z'"),
        ("CN.31.CM-CC/GPU.4K7Q9M2XH3PT-Z", "segment 3 'CM-CC' has a character outside [0-9A-Z]"),
        ("CN.31.CMCC/TPU.4K7Q9M2XH3PT-Z", "unknown kind 'TPU'"),
        ("CN.31.CMCC/GPU.4K7Q9M2XH3P-Z", "serial must be 12 characters of Crockford base32"),
    ],
)
def test_id_check(text: str, reason: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", "check", text]) == 1
    err = capsys.readouterr().err
    assert reason in err and text in err


def test_id_check_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["id", "check", EXAMPLE.lower()]) == 0
    assert capsys.readouterr().out.strip() == EXAMPLE


def test_id_derive_matches_library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = keys.generate()
    keyfile.write_private(tmp_path / "n.key", key)
    keyfile.write_public(tmp_path / "n.pub", key)
    (tmp_path / "n.b64").write_text(keys.public_to_b64url(key) + "\n")
    expected = str(cpid.derive("CN.31.CMCC", "GPU", keys.public_raw(key)))
    for f in ("n.key", "n.pub", "n.b64"):
        assert (
            main(
                [
                    "id",
                    "derive",
                    "--namespace",
                    "cn.31.cmcc",
                    "--kind",
                    "gpu",
                    "--pubkey",
                    str(tmp_path / f),
                ]
            )
            == 0
        )
        assert capsys.readouterr().out.strip() == expected


def test_id_derive_rejects_bad_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keyfile.write_public(tmp_path / "n.pub", keys.generate())
    assert (
        main(
            [
                "id",
                "derive",
                "--namespace",
                "CN.3_1",
                "--kind",
                "GPU",
                "--pubkey",
                str(tmp_path / "n.pub"),
            ]
        )
        == 1
    )
    assert "segment 2 '3_1'" in capsys.readouterr().err


def test_demo_then_verify_valid_and_tampered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("verified: True") == 3
    bundles = sorted(p for p in tmp_path.glob("*.json") if p.name != "anchor.json")
    anchor = str(tmp_path / "anchor.json")
    assert main(["verify", str(bundles[0]), "--anchor", anchor]) == 0
    assert capsys.readouterr().out.strip().endswith("valid")

    doc = json.loads(bundles[0].read_text())
    doc["chain"] = doc["chain"][:1]  # drop the cert the root issued
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(doc))
    assert main(["verify", str(broken), "--anchor", anchor, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["rule"], report["link"]) == (False, 2, 1)


def test_verify_other_anchor_fails_rule_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    other = tmp_path / "other-anchor.json"
    other.write_bytes(ca.make_anchor("CN", keys.generate()).to_json())
    bundle = next(p for p in tmp_path.glob("*.json") if "anchor" not in p.name)
    assert main(["verify", str(bundle), "--anchor", str(other)]) == 1
    assert "rule 2 failed" in capsys.readouterr().out


def test_verify_malformed_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    anchor = tmp_path / "anchor.json"
    anchor.write_bytes(ca.make_anchor("CN", keys.generate()).to_json())
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["verify", str(bad), "--anchor", str(anchor)]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def test_up_without_a_usable_etcd_says_how_to_get_one(tmp_path: Path) -> None:
    # a clean message and exit 1, not a traceback, when $CPI_ETCD_BINARY is not a program
    env = {**os.environ, "CPI_ETCD_BINARY": str(tmp_path / "missing-etcd")}
    done = subprocess.run(
        [sys.executable, "-m", "cpi", "up", "--data-dir", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "CPI_ETCD_BINARY" in done.stderr and "not an executable file" in done.stderr

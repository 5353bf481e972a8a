"""``cpi verify`` and ``cpi audit verify`` with ``--endorsement``: a client holding only
CN's anchor verifies an SG record through CN's endorsement of SG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpi.main import main
from registry import ca
from tests.schemas.test_endorsement import CN, NOW, doc, sg_bundle


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    record, chain = sg_bundle()
    bundle = tmp_path / "bundle.json"
    bundle.write_text(
        json.dumps({"record": record.to_dict(), "chain": [c.to_dict() for c in chain]})
    )
    anchor = tmp_path / "cn.json"
    anchor.write_bytes(ca.make_anchor("CN", CN).to_json())
    good = tmp_path / "endorse.json"
    good.write_text(json.dumps(ca.sign_document(doc(), CN).to_dict()))
    narrow = tmp_path / "narrow.json"
    narrow.write_text(json.dumps([ca.sign_document(doc(permitted=["SG.02"]), CN).to_dict()]))
    return {"bundle": str(bundle), "anchor": str(anchor), "good": str(good), "narrow": str(narrow)}


@pytest.mark.parametrize("command", [["verify"], ["audit", "verify"]])
def test_verify_through_an_endorsement(
    files: dict[str, str], command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    base = [*command, files["bundle"], "--anchor", files["anchor"], "--now", str(NOW)]
    assert main(base) == 1  # CN's anchor alone: SG's chain ends at no anchor
    assert "not an anchor" in capsys.readouterr().out
    assert main([*base, "--endorsement", files["good"]]) == 0
    assert capsys.readouterr().out.rstrip().endswith("valid")
    assert main([*base, "--endorsement", files["narrow"]]) == 1
    assert "outside the namespaces the endorsement" in capsys.readouterr().out
    late = [*command, files["bundle"], "--anchor", files["anchor"], "--now", str(NOW + 7200)]
    assert main([*late, "--endorsement", files["good"]]) == 1  # expired endorsement
    assert "endorsement of SG by CN is valid from" in capsys.readouterr().err

"""endorsement.v1 and the chain's endorsement path (docs/protocol.md §10)."""

from __future__ import annotations

from typing import Any

import pytest

from registry import ca
from schemas import dsse, keys
from schemas.chain import TrustAnchors, endorsed_anchors, verify_endorsement, verify_record
from schemas.cpid import derive
from schemas.endorsement import MAX_WINDOW_S, Endorsement
from schemas.errors import ChainError, ExpiredError, PayloadError
from schemas.models import Location, Record, parse_payload

NOW = 1_800_000_000
CN, SG = keys.generate(), keys.generate()
SG_NS = keys.generate()


def doc(**changes: Any) -> Endorsement:
    fields: dict[str, Any] = {
        "issuer": "CN",
        "subject": "SG",
        "public_key": keys.public_to_b64url(SG),
        "permitted": ["SG"],
        "serial": "e-1",
        "not_before": NOW - 100,
        "not_after": NOW + 3600,
    }
    fields.update(changes)
    return Endorsement(**fields)


def sg_bundle(namespace: str = "SG.01") -> tuple[dsse.Envelope, list[dsse.Envelope]]:
    cert = ca.issue_cert(
        issuer_key=SG,
        issuer_subject="SG",
        subject=namespace,
        public_key=SG_NS,
        scopes=["issue"],
        now=NOW,
    )
    node = keys.generate()
    cpid = derive(namespace, "GPU", keys.public_raw(node)).to_text()
    rec = Record(
        cpid=cpid,
        kind="GPU",
        public_key=keys.public_to_b64url(node),
        issuer=namespace,
        version=1,
        issued_at=NOW - 10,
        expires_at=NOW + 3600,
        location=Location(region="31"),
    )
    return ca.sign_document(rec, SG_NS), [cert]


CN_ONLY = TrustAnchors([ca.make_anchor("CN", CN)])


def test_a_client_holding_only_cn_verifies_sg_records_through_the_endorsement() -> None:
    env = ca.sign_document(doc(), CN)
    record, chain = sg_bundle()
    assert not verify_record(record, chain, anchors=CN_ONLY, now=NOW).ok
    anchors = endorsed_anchors(CN_ONLY, [env], now=NOW)
    assert anchors.subjects == ["CN", "SG"]
    assert verify_record(record, chain, anchors=anchors, now=NOW).ok


def test_name_constraints_bind_the_record() -> None:
    anchors = endorsed_anchors(CN_ONLY, [ca.sign_document(doc(permitted=["SG.02"]), CN)], now=NOW)
    record, chain = sg_bundle("SG.01")
    result = verify_record(record, chain, anchors=anchors, now=NOW)
    assert result.failure is not None and result.failure.rule == 2
    assert result.failure.link == 1
    assert "outside the namespaces the endorsement of 'SG' permits" in result.reason
    record, chain = sg_bundle("SG.02")
    assert verify_record(record, chain, anchors=anchors, now=NOW).ok


def test_refused_endorsements() -> None:
    env = ca.sign_document(doc(), CN)
    with pytest.raises(ExpiredError, match="valid from"):
        verify_endorsement(env, anchors=CN_ONLY, now=NOW + 3600 + 61)
    assert verify_endorsement(env, anchors=CN_ONLY, now=NOW + 3600 + 60).subject == "SG"
    with pytest.raises(ChainError, match="not a root anchor"):
        verify_endorsement(ca.sign_document(doc(), SG), anchors=CN_ONLY, now=NOW)
    with pytest.raises(ChainError, match="names issuer 'JP'"):
        verify_endorsement(ca.sign_document(doc(issuer="JP"), CN), anchors=CN_ONLY, now=NOW)
    tampered = dsse.Envelope(env.payload_type, env.payload.replace(b"e-1", b"e-2"), env.signatures)
    with pytest.raises(ChainError, match="not validly signed"):
        verify_endorsement(tampered, anchors=CN_ONLY, now=NOW)
    wrong_type = dsse.sign("application/vnd.cpi.cert.v1+json", doc().to_json(), CN)
    with pytest.raises(ChainError, match="not validly signed"):
        verify_endorsement(wrong_type, anchors=CN_ONLY, now=NOW)
    # an endorsed root does not endorse further
    anchors = endorsed_anchors(CN_ONLY, [env], now=NOW)
    jp = doc(issuer="SG", subject="JP", permitted=["JP"])
    with pytest.raises(ChainError, match="not a root anchor"):
        verify_endorsement(ca.sign_document(jp, SG), anchors=anchors, now=NOW)
    # an endorsement cannot replace a configured anchor
    with pytest.raises(ChainError, match="already an anchor"):
        endorsed_anchors(
            TrustAnchors([ca.make_anchor("CN", CN), ca.make_anchor("SG", SG)]), [env], now=NOW
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"issuer": "CN.31"}, "is not a root"),
        ({"subject": "CN"}, "does not endorse itself"),
        ({"permitted": ["CN"]}, "is not inside 'SG'"),
        ({"permitted": ["SG", "SG"]}, "repeats"),
        ({"permitted": []}, "at least 1"),
        ({"not_after": NOW - 100}, "is not after"),
        ({"not_after": NOW - 100 + MAX_WINDOW_S + 1}, "exceeds"),
    ],
)
def test_model_bounds(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        doc(**changes)


def test_payload_round_trip_and_size_bound() -> None:
    d = doc(permitted=[f"SG.{i}" for i in range(16)])
    assert parse_payload(Endorsement.media_type(), d.to_json(), Endorsement) == d
    with pytest.raises(PayloadError, match="unknown field"):
        parse_payload(Endorsement.media_type(), d.to_json()[:-1] + b',"extra":1}', Endorsement)
    assert Endorsement.MAX_BYTES == 2048
    assert len(d.to_json()) < 2048

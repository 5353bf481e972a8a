"""Chain verification: the five rules of docs/protocol.md §2–5, each failing on its own.

The chains are real: fixed-seed Ed25519 keys, CN -> CN.31 -> CN.31.CMCC (and SG ->
SG.01), built by ``tools/gen_vectors.py`` whose case table also feeds
``tests/vectors/chains.json``.  Each case there names the rule and link that must fail
and a pattern for the detail.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from schemas import dsse, keys
from schemas.chain import (
    CLOCK_SKEW,
    MAX_DEPTH,
    ChainResult,
    TrustAnchors,
    open_self_signed,
    open_signed,
    prepare_chain,
    require_chain,
    require_record,
    verify_chain,
    verify_record,
    verify_record_prepared,
)
from schemas.errors import (
    ChainError,
    EnvelopeError,
    ExpiredError,
    KeyFileError,
    PayloadError,
    RevokedError,
    SignatureError,
)
from schemas.models import Deregister, Register, Status, parse_payload
from tools import gen_vectors as gv

CASES = gv.chain_cases()
NOW = gv.NOW
T = gv.tree()
CMCC = T["CN.31.CMCC"]
NODE = gv.node_key("1")
GOOD = gv.record(CMCC, NODE)
CN = TrustAnchors([T["CN"].anchor()])
BOTH = TrustAnchors([T["CN"].anchor(), T["SG"].anchor()])


def _verify(case: gv.ChainCase, **kw: Any) -> ChainResult:
    return verify_record(
        case.record,
        case.chain,
        anchors=TrustAnchors(case.anchors),
        revocations=case.revocations,
        now=case.now,
        **kw,
    )


def test_case_table_covers_every_rule() -> None:
    assert {c.rule for c in CASES} == {None, 1, 2, 3, 4, 5}
    assert len({c.id for c in CASES}) == len(CASES)
    for c in CASES:
        assert c.ok or c.match, f"{c.id}: a failing case needs a detail pattern"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: gv.ChainCase) -> None:
    result = _verify(case)
    if case.ok:
        assert result.ok, result.reason
        assert result.failure is None
        assert result.reason == ""
        assert result.record is not None
        assert len(result.certs) == len(case.chain)
        assert all(c.ok for c in result.checks)
        assert {c.rule for c in result.checks} == {1, 2, 3, 4, 5}
        return
    assert not result.ok
    f = result.failure
    assert f is not None
    assert (f.rule, f.link) == (case.rule, case.link), f.detail
    assert re.search(case.match, f.detail), f.detail
    assert result.reason == f"rule {case.rule} failed at link {case.link}: {f.detail}"
    assert result.record is None
    # the checks stop at the first failure
    assert result.checks[-1] is f
    assert all(c.ok for c in result.checks[:-1])


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_verdict_only_gives_the_same_verdict(case: gv.ChainCase) -> None:
    """``checks=False`` (what the resolver uses): the same result, minus passing checks."""
    full = _verify(case)
    prepared = prepare_chain(
        case.chain, anchors=TrustAnchors(case.anchors), revocations=case.revocations, now=case.now
    )
    fast = verify_record_prepared(case.record, prepared, checks=False)
    assert (fast.ok, fast.failure, fast.reason) == (full.ok, full.failure, full.reason)
    assert (fast.record, fast.certs) == (full.record, full.certs)
    assert fast.checks == (() if full.failure is None else (full.failure,))
    assert fast.to_dict() == {**full.to_dict(), "checks": fast.to_dict()["checks"]}
    assert verify_record_prepared(case.record, prepared).checks == full.checks


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_require_record_raises_the_same(case: gv.ChainCase) -> None:
    kw: dict[str, Any] = {
        "anchors": TrustAnchors(case.anchors),
        "revocations": case.revocations,
        "now": case.now,
    }
    if case.ok:
        rec = require_record(case.record, case.chain, **kw)
        assert rec.to_json() == case.record.payload
        return
    expected = {3: ExpiredError, 4: RevokedError}.get(case.rule or 0, ChainError)
    with pytest.raises(
        ChainError, match=rf"^rule {case.rule} failed at link {case.link}: "
    ) as info:
        require_record(case.record, case.chain, **kw)
    assert type(info.value) is expected
    assert (info.value.rule, info.value.link) == (case.rule, case.link)
    assert re.search(case.match, info.value.reason)
    assert info.value.code == {3: "expired", 4: "revoked"}.get(case.rule or 0, "chain_invalid")


# -- named scenarios, spelled out ------------------------------------------------------------------


def test_good_chain_result() -> None:
    result = verify_record(GOOD, CMCC.chain, anchors=CN, now=NOW)
    assert result.ok
    assert [c.subject for c in result.certs] == ["CN.31.CMCC", "CN.31"]
    assert result.record is not None
    assert result.record.cpid.startswith("CN.31.CMCC/GPU.")
    d = result.to_dict()
    assert d["ok"] is True and d["rule"] is None and d["link"] is None and d["reason"] == ""
    assert [(c["rule"], c["link"]) for c in d["checks"]][:2] == [(1, 1), (2, 2)]
    assert json.loads(json.dumps(d)) == d


def test_failure_result_to_dict() -> None:
    result = verify_record(GOOD, CMCC.chain, anchors=TrustAnchors([T["SG"].anchor()]), now=NOW)
    d = result.to_dict()
    assert (d["ok"], d["rule"], d["link"]) == (False, 2, 2)
    assert d["reason"].startswith("rule 2 failed at link 2: top cert is signed by key")
    assert d["checks"][-1]["ok"] is False


def test_records_survive_a_json_round_trip() -> None:
    record = dsse.Envelope.from_json(GOOD.to_json())
    chain = [dsse.Envelope.from_json(e.to_json()) for e in CMCC.chain]
    assert verify_record(record, chain, anchors=CN, now=NOW).ok


def test_string_prefix_traps() -> None:
    cn3 = gv.delegate(T["CN"], "CN.3")
    # CN.3 signing a CN.31 record
    r = verify_record(gv.record(cn3, NODE, namespace="CN.31.CMCC"), cn3.chain, anchors=CN, now=NOW)
    assert r.failure is not None
    assert (r.failure.rule, r.failure.link) == (1, 0)
    assert "CPID prefix 'CN.31.CMCC' is not the signer's subject 'CN.3'" in r.failure.detail
    # CN.3 delegating CN.31
    cn31 = gv.delegate(cn3, "CN.31")
    r = verify_record(gv.record(cn31, NODE), cn31.chain, anchors=CN, now=NOW)
    assert r.failure is not None
    assert (r.failure.rule, r.failure.link) == (2, 1)
    assert "issuer 'CN.3' does not contain subject 'CN.31'" in r.failure.detail


def test_multiple_trust_anchors() -> None:
    sg01 = T["SG.01"]
    sg_record = gv.record(sg01, NODE, kind="SVC", region="01")
    assert verify_record(sg_record, sg01.chain, anchors=BOTH, now=NOW).ok
    assert verify_record(GOOD, CMCC.chain, anchors=BOTH, now=NOW).ok
    only_sg = TrustAnchors([T["SG"].anchor()])
    assert verify_record(sg_record, sg01.chain, anchors=only_sg, now=NOW).ok
    r = verify_record(GOOD, CMCC.chain, anchors=only_sg, now=NOW)
    assert r.failure is not None
    assert (r.failure.rule, r.failure.link) == (2, 2)
    assert "(anchors: SG)" in r.failure.detail
    r = verify_record(sg_record, sg01.chain, anchors=CN, now=NOW)
    assert r.failure is not None and "(anchors: CN)" in r.failure.detail


@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (-CLOCK_SKEW - 1, False),
        (-CLOCK_SKEW, True),
        (0, True),
        (CLOCK_SKEW, True),
        (CLOCK_SKEW + 1, False),
    ],
)
def test_clock_skew_at_both_ends_of_the_record_window(offset: int, ok: bool) -> None:
    issued, expires = NOW - 3600, NOW + 3600
    rec = gv.record(CMCC, NODE, issued_at=issued, expires_at=expires)
    # "offset" seconds before the start, and "offset" seconds after the end
    before = verify_record(rec, CMCC.chain, anchors=CN, now=issued - offset)
    after = verify_record(rec, CMCC.chain, anchors=CN, now=expires + offset)
    if offset <= 0:
        assert before.ok and after.ok
        return
    assert before.ok is ok and after.ok is ok
    if not ok:
        assert before.failure is not None and after.failure is not None
        assert (before.failure.rule, before.failure.link) == (3, 0)
        assert "not valid before" in before.failure.detail
        assert (after.failure.rule, after.failure.link) == (3, 0)
        assert "expired at" in after.failure.detail


def test_skew_is_configurable() -> None:
    rec = gv.record(CMCC, NODE, expires_at=NOW - 30)
    assert verify_record(rec, CMCC.chain, anchors=CN, now=NOW).ok
    strict = verify_record(rec, CMCC.chain, anchors=CN, now=NOW, skew=0)
    assert strict.failure is not None and strict.failure.rule == 3


def test_depth_limit() -> None:
    assert MAX_DEPTH == 8
    deep = gv._deep(MAX_DEPTH)
    assert len(deep.chain) == 8
    assert verify_record(gv.record(deep, NODE), deep.chain, anchors=CN, now=NOW).ok
    deeper = gv.delegate(deep, deep.subject + ".9")
    assert len(deeper.chain) == 9
    with pytest.raises(ChainError, match=r"^rule 2 failed at link 9: chain depth 9 exceeds 8$"):
        require_record(gv.record(deeper, NODE), deeper.chain, anchors=CN, now=NOW)


def test_revocation_only_counts_from_above() -> None:
    serial = CMCC.serial
    by = {
        "issuer": gv.revocation(T["CN.31"], "CN.31.CMCC", serial=serial),
        "root": gv.revocation(T["CN"], "CN.31.CMCC", serial=serial),
        "sibling": gv.revocation(T["CN.32"], "CN.31.CMCC", serial=serial),
        "itself": gv.revocation(CMCC, "CN.31.CMCC", serial=serial),
        "node": gv.revocation(NODE, "CN.31.CMCC", serial=serial),
        "other root": gv.revocation(T["SG"], "CN.31.CMCC", serial=serial),
    }
    outcome = {
        who: verify_record(GOOD, CMCC.chain, anchors=BOTH, revocations={serial: env}, now=NOW).ok
        for who, env in by.items()
    }
    assert outcome == {
        "issuer": False,
        "root": False,
        "sibling": True,
        "itself": True,
        "node": True,
        "other root": True,
    }


def test_revocation_stored_under_another_ident_is_ignored() -> None:
    env = gv.revocation(T["CN.31"], "CN.31.CMCC", serial="some-other-serial")
    assert verify_record(GOOD, CMCC.chain, anchors=CN, revocations={CMCC.serial: env}, now=NOW).ok


def test_revoked_key_and_serial_raise_revoked_error() -> None:
    for ident, env in [
        (CMCC.serial, gv.revocation(T["CN.31"], "CN.31.CMCC", serial=CMCC.serial)),
        (CMCC.kid, gv.revocation(T["CN.31"], "CN.31.CMCC", kid=CMCC.kid)),
    ]:
        with pytest.raises(
            RevokedError,
            match=rf"^rule 4 failed at link 1: {ident} \(CN\.31\.CMCC\) revoked at \d+: key compromise$",
        ):
            require_record(GOOD, CMCC.chain, anchors=CN, revocations={ident: env}, now=NOW)


def test_expired_raises_expired_error() -> None:
    rec = gv.record(CMCC, NODE, expires_at=NOW - 3600)
    with pytest.raises(
        ExpiredError,
        match=rf"^rule 3 failed at link 0: record CN\.31\.CMCC/GPU\.\S+ expired at {NOW - 3600}, now is {NOW}$",
    ):
        require_record(rec, CMCC.chain, anchors=CN, now=NOW)


def test_real_clock_is_the_default() -> None:
    now = int(time.time())
    reg = gv.delegate(T["CN"], "CN.31", not_before=now - 3600, not_after=now + 3600)
    rec = gv.record(reg, NODE, issued_at=now - 60, expires_at=now + 3600)
    assert verify_record(rec, reg.chain, anchors=CN).ok
    old = gv.record(reg, NODE, issued_at=now - 7200, expires_at=now - 3600)
    r = verify_record(old, reg.chain, anchors=CN)
    assert r.failure is not None and r.failure.rule == 3


# -- chains alone ------------------------------------------------------------------------------------


def test_verify_chain() -> None:
    result = verify_chain(CMCC.chain, anchors=CN, now=NOW)
    assert result.ok
    assert [c.subject for c in result.certs] == ["CN.31.CMCC", "CN.31"]
    assert require_chain(CMCC.chain, anchors=CN, now=NOW) == result.certs
    assert {c.rule for c in result.checks} == {1, 2, 3, 4}


def test_verify_chain_failures() -> None:
    r = verify_chain([], anchors=CN, now=NOW)
    assert r.failure is not None and (r.failure.rule, r.failure.link) == (1, 1)
    assert r.certs == ()
    old = gv.delegate(T["CN"], "CN.31", not_after=NOW - 3600)
    with pytest.raises(ExpiredError, match=r"^rule 3 failed at link 1: cert for CN\.31 expired at"):
        require_chain(old.chain, anchors=CN, now=NOW)


# -- trust anchors -------------------------------------------------------------------------------------


def test_trust_anchors_from_json() -> None:
    one = T["CN"].anchor().to_json()
    assert TrustAnchors.from_json(one).subjects == ["CN"]
    both = json.dumps([json.loads(T["SG"].anchor().to_json()), json.loads(one)])
    anchors = TrustAnchors.from_json(both)
    assert anchors.subjects == ["CN", "SG"]
    assert {a.subject for a in anchors} == {"CN", "SG"}
    assert anchors.get(T["CN"].kid) is not None
    assert anchors.get("NOPE") is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", r"^anchor file is not valid JSON"),
        ("[]", r"^at least one trust anchor is required$"),
        (
            '{"type": "anchor.v1", "subject": "CN"}',
            r"(?s)^invalid anchor: .*public_key\n  Field required",
        ),
        ('{"type": "anchor.v1", "subject": "C", "public_key": "x"}', r"^invalid anchor: "),
    ],
)
def test_trust_anchors_invalid(text: str, match: str) -> None:
    with pytest.raises(KeyFileError, match=match):
        TrustAnchors.from_json(text)


# -- documents signed by one known key -------------------------------------------------------------------

NODE_PK = keys.public_to_b64url(NODE)
REG_DOC = gv.envelope_documents()[1][1]
STATUS_DOC = gv.envelope_documents()[3][1]
DEREG_DOC = gv.envelope_documents()[4][1]


def test_open_signed_status_under_the_records_key() -> None:
    record = require_record(GOOD, CMCC.chain, anchors=CN, now=NOW)
    env = gv.sign_doc(STATUS_DOC, NODE)
    status = open_signed(env, public_key=record.public_key, expected=Status)
    assert status == STATUS_DOC
    assert status.cpid == record.cpid


def test_open_signed_deregister() -> None:
    env = gv.sign_doc(DEREG_DOC, NODE)
    assert open_signed(env, public_key=NODE_PK, expected=Deregister) == DEREG_DOC


def test_open_signed_rejects_another_key() -> None:
    env = gv.sign_doc(STATUS_DOC, gv.key("intruder"))
    with pytest.raises(SignatureError, match=r"^0 of 1 required signatures verify"):
        open_signed(env, public_key=NODE_PK, expected=Status)


def test_open_signed_rejects_another_type() -> None:
    env = gv.sign_doc(DEREG_DOC, NODE)
    with pytest.raises(
        SignatureError,
        match=r"payloadType 'application/vnd\.cpi\.deregister\.v1\+json' is not one of",
    ):
        open_signed(env, public_key=NODE_PK, expected=Status)


def test_open_signed_rejects_a_bad_payload_after_the_signature_holds() -> None:
    env = gv.sign_doc(STATUS_DOC, NODE, payload=STATUS_DOC.to_json()[:-1] + b',"x":1}')
    with pytest.raises(PayloadError, match=r"^invalid status\.v1: x: unknown field$"):
        open_signed(env, public_key=NODE_PK, expected=Status)


@pytest.mark.parametrize("public_key", ["", "not a key", NODE_PK[:-4]])
def test_open_signed_rejects_a_bad_public_key(public_key: str) -> None:
    env = gv.sign_doc(STATUS_DOC, NODE)
    with pytest.raises(EnvelopeError, match=r"^invalid public key: "):
        open_signed(env, public_key=public_key, expected=Status)


def test_open_self_signed_register_proves_possession() -> None:
    env = gv.sign_doc(REG_DOC, NODE)
    assert open_self_signed(env, expected=Register) == REG_DOC


def test_open_self_signed_rejects_a_key_the_signer_does_not_hold() -> None:
    # the payload names the node's key; someone else signed it
    env = gv.sign_doc(REG_DOC, gv.key("intruder"))
    with pytest.raises(SignatureError, match="0 of 1 required signatures verify"):
        open_self_signed(env, expected=Register)
    # the signer names its own key id, but the payload carries the node's key
    env = gv.sign_doc(REG_DOC, gv.key("intruder"), keyid=keys.kid_of(NODE))
    with pytest.raises(SignatureError):
        open_self_signed(env, expected=Register)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not json", r"^register\.v1 payload has no usable 'public_key'"),
        (b"[]", r"^register\.v1 payload has no usable 'public_key'"),
        (
            b'{"type": "register.v1"}',
            r"^register\.v1 payload has no usable 'public_key': 'public_key'",
        ),
        (b'{"public_key": 7}', r"has no usable 'public_key': public_key is not a string"),
        (
            b'{"public_key": "a", "public_key": "b"}',
            r"has no usable 'public_key': duplicate member name 'public_key'",
        ),
    ],
)
def test_open_self_signed_malformed(payload: bytes, match: str) -> None:
    env = gv.sign_doc(REG_DOC, NODE, payload=payload)
    with pytest.raises(PayloadError, match=match):
        open_self_signed(env, expected=Register)


def test_open_self_signed_checks_the_whole_payload_after_the_signature() -> None:
    bad = REG_DOC.to_json().replace(b'"kind":"GPU"', b'"kind":"TPU"')
    env = gv.sign_doc(REG_DOC, NODE, payload=bad)
    with pytest.raises(PayloadError, match=r"^invalid register\.v1: kind: unknown kind 'TPU'"):
        open_self_signed(env, expected=Register)


def test_open_self_signed_without_a_key_field() -> None:
    env = gv.sign_doc(STATUS_DOC, NODE)
    with pytest.raises(PayloadError, match=r"^status\.v1 payload has no usable 'public_key'"):
        open_self_signed(env, expected=Status)


# -- the registration path reads the payload once and verifies under raw key bytes ---------

_ED25519_VECTORS = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "ed25519.json").read_text()
)["cases"]


@pytest.mark.parametrize("case", _ED25519_VECTORS, ids=lambda c: c["id"])
def test_open_self_signed_applies_the_full_key_rule_to_every_vector_key(
    case: dict[str, Any],
) -> None:
    # the key a register.v1 carries gets libsodium's whole key rule (small order in any
    # encoding, non-canonical, off the curve, outside the prime-order subgroup) before
    # any signature is looked at; an acceptable key then needs a signature that holds
    raw = bytes.fromhex(case["public_key_hex"])
    doc = REG_DOC.model_copy(update={"public_key": keys.b64url_encode(raw)})
    env = gv.sign_doc(doc, NODE, keyid=keys.kid(raw))
    if case["key"]["verdict"] == "reject":
        with pytest.raises(EnvelopeError, match=r"^invalid public key: "):
            open_self_signed(env, expected=Register)
    else:
        with pytest.raises(SignatureError):
            open_self_signed(env, expected=Register)


def test_open_self_signed_gives_what_parse_payload_gives() -> None:
    # the payload read before the signature check is the one validated after it
    env = gv.sign_doc(REG_DOC, NODE)
    assert open_self_signed(env, expected=Register) == parse_payload(
        env.payload_type, env.payload, Register
    )
    obj = json.loads(env.payload)
    assert parse_payload(env.payload_type, env.payload, Register, parsed=obj) == REG_DOC


def test_dsse_verify_under_raw_key_bytes_is_the_key_objects_verdict() -> None:
    env = gv.sign_doc(REG_DOC, NODE)
    kid = keys.kid_of(NODE)
    assert dsse.verify(env, {kid: keys.public_raw(NODE)}).keyids == frozenset({kid})
    other = gv.key("intruder")
    with pytest.raises(SignatureError):
        dsse.verify(env, {kid: keys.public_raw(other)})

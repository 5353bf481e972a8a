"""The console in headless Chromium: tree, resource verification, discovery, log, claims.

Every test starts from a fresh page on the resolver of the ``stack`` fixture and fails
on any console error (a CSP violation included) unless it allows that error by name.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from axe_playwright_python.sync_playwright import Axe

from registry.index import Keys
from schemas import dsse, keys
from tests.resolver.kit import Node
from tests.ui.conftest import Console, Stack

ROOT = Path(__file__).resolve().parents[2]


def pin_served_anchor(page: Any, stack: Stack) -> str:
    page.get_by_role("button", name="Use the resolver's anchor").click()
    kid = stack.pki.kid("CN")
    page.wait_for_selector(f'#anchor-state[data-kid="{kid}"]')
    return kid


def open_resource(page: Any, cpid: str) -> None:
    page.goto(f"/ui/#/resource/{cpid}")


def verdict(page: Any) -> tuple[str, str]:
    # a selector, not wait_for_function: the page's CSP forbids the eval that needs
    page.wait_for_selector("#verdict[data-state='verified'], #verdict[data-state='failed']")
    el = page.locator("#verdict")
    return str(el.get_attribute("data-state")), el.inner_text()


def axe_clean(page: Any) -> None:
    results = Axe().run(page)
    violations = results.response["violations"]
    assert violations == [], results.generate_report()


def test_the_page_is_served_with_a_strict_csp(page: Any, stack: Stack) -> None:
    resp = page.goto("/ui/")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    html = (ROOT / "resolver/ui/static/index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert "<style" not in html and " style=" not in html, "inline style"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        with urllib.request.urlopen(f"{stack.url}/ui/{name}") as resp:
            assert resp.headers["Content-Type"].startswith(kind)
            assert resp.headers["Content-Security-Policy"] == csp
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{stack.url}/ui/..%2Fhttp.py")
    assert err.value.code == 404
    err.value.close()
    anchor = stack.get("/v1/anchor")
    assert anchor["anchors"][0]["kid"] == stack.pki.kid("CN")
    assert anchor["log_vkeys"] == [stack.vkey]


def test_tree_counts_equal_discover(page: Any, stack: Stack, shots: Path) -> None:
    page.set_viewport_size({"width": 1100, "height": 900})
    page.goto("/ui/#/tree")
    page.wait_for_selector('#tree li[data-prefix="CN"]')
    for prefix in ("CN", "CN.31", "CN.31.CMCC", "CN.32", "CN.3"):
        want = stack.get(f"/v1/discover?within={prefix}&limit=500")["results"]
        live = sum(1 for r in want if r["live"])
        li = page.locator(f'#tree li[data-prefix="{prefix}"]').first
        assert li.get_attribute("data-count") == str(len(want)), prefix
        assert li.get_attribute("data-live") == str(live), prefix
    page.screenshot(path=str(shots / "console-tree.png"))
    axe_clean(page)


def test_chain_verified_against_an_anchor_file(page: Any, stack: Stack, shots: Path) -> None:
    cpid = stack.nodes[0].cpid
    page.set_viewport_size({"width": 1100, "height": 1400})
    page.goto("/ui/")
    page.set_input_files("#anchor-file", str(stack.anchor_path))
    kid = stack.pki.kid("CN")
    page.wait_for_selector(f'#anchor-state[data-kid="{kid}"]')
    open_resource(page, cpid)
    state, text = verdict(page)
    assert state == "verified", text
    assert f"Verified in your browser against anchor {kid}" in text
    steps = page.locator("#chain-steps li")
    # anchor, CN.31 (signed by the anchor), CN.31.CMCC, the record signature, the record
    # checks, the status
    assert steps.count() == 6
    assert all(s == "true" for s in steps.evaluate_all("els => els.map(e => e.dataset.ok)"))
    assert page.locator("#check-char").get_attribute("data-ok") == "true"
    assert "live" in page.locator("#live-state").inner_text()
    page.wait_for_selector("#inclusion[data-ok]")
    inclusion = page.locator("#inclusion").inner_text()
    assert page.locator("#inclusion").get_attribute("data-ok") == "true", inclusion
    assert "proof verified here" in inclusion
    page.screenshot(path=str(shots / "console.png"), full_page=True)
    axe_clean(page)


def test_registration_appears_live_and_leaves_on_deregistration(page: Any, stack: Stack) -> None:
    page.goto("/ui/#/tree")
    page.wait_for_selector("#tree-state:has-text('Live')")
    page.evaluate("window.__same_page = true")
    node = Node(namespace="CN.32", region="32", model="H20")
    t0 = time.monotonic()
    stack.register(node, sign_log=False)
    page.wait_for_selector(f'#tree li[data-cpid="{node.cpid}"]', timeout=2000)
    appeared = time.monotonic() - t0
    count = page.locator('#tree li[data-prefix="CN.32"]').get_attribute("data-count")
    assert count == str(len(stack.get("/v1/discover?within=CN.32&limit=500")["results"]))
    t1 = time.monotonic()
    stack.deregister(node)
    page.wait_for_selector(f'#tree li[data-cpid="{node.cpid}"]', state="detached", timeout=2000)
    left = time.monotonic() - t1
    assert page.evaluate("window.__same_page") is True  # no reload
    print(f"\nregistration -> tree: {appeared * 1000:.0f} ms; deregistration: {left * 1000:.0f} ms")
    assert appeared < 2.0 and left < 2.0


def _flip_sig(env: dict[str, Any]) -> dict[str, Any]:
    sig = bytearray(base64.b64decode(env["signatures"][0]["sig"]))
    sig[40] ^= 0x01  # inside S, well below L's top byte: still reduced, just wrong
    out = dict(env)
    out["signatures"] = [{**env["signatures"][0], "sig": base64.b64encode(sig).decode()}]
    return out


def serve_instead(page: Any, cpid: str, bundle: dict[str, Any]) -> None:
    page.route(
        f"**/v1/resources/{cpid}",
        lambda route: route.fulfill(
            status=200, content_type="application/json", body=json.dumps(bundle)
        ),
    )


def test_a_tampered_signature_is_never_shown_verified(page: Any, stack: Stack) -> None:
    cpid = stack.nodes[1].cpid
    bundle = stack.get(f"/v1/resources/{cpid}")
    bundle["record"] = _flip_sig(bundle["record"])
    serve_instead(page, cpid, bundle)
    page.goto("/ui/")
    pin_served_anchor(page, stack)
    open_resource(page, cpid)
    state, text = verdict(page)
    assert state == "failed"
    assert "NOT verified: the record's signature does not verify" in text
    assert "Ed25519 equation does not hold" in text
    assert page.locator("#live-state").count() == 0  # nothing of it shown as fact


def test_a_record_tampered_in_etcd_is_not_served_nor_verified(
    page: Any, stack: Stack, console: Console
) -> None:
    node = Node(namespace="CN.31.CMCC", region="31", model="L40")
    cpid = stack.register(node, sign_log=False)
    stored = stack.served(cpid)["record"]
    stack.put_raw(Keys.rec(cpid), json.dumps(_flip_sig(stored), separators=(",", ":")).encode())
    console.allow("404")
    page.goto("/ui/")
    pin_served_anchor(page, stack)
    deadline = time.monotonic() + 5
    while True:  # the resolver drops the record once its replica sees the write
        open_resource(page, cpid)
        state, text = verdict(page)
        assert state == "failed", text
        if "not_found" in text or time.monotonic() > deadline:
            break
        page.goto("/ui/#/tree")
    assert "NOT verified: the resolver answered not_found" in text
    stack.deregister(node)


def test_a_small_order_key_is_not_verified_though_webcrypto_accepts_it(
    page: Any, stack: Stack
) -> None:
    """The CN.31.CMCC cert is replaced by one (validly signed by CN.31) certifying the
    identity point, and the record's signature by R = identity, S = 0, which satisfies
    the bare cofactorless equation for every message."""
    cpid = stack.nodes[0].cpid
    bundle = stack.get(f"/v1/resources/{cpid}")
    identity = b"\x01" + bytes(31)
    cert = dsse.Envelope.from_json(json.dumps(bundle["chain"][0]).encode())
    payload = json.loads(cert.payload)
    payload["public_key"] = keys.b64url_encode(identity)
    forged = dsse.sign(cert.payload_type, json.dumps(payload).encode(), stack.pki.keys["CN.31"])
    bundle["chain"][0] = json.loads(forged.to_json())
    sig = base64.b64encode(identity + bytes(32)).decode()
    bundle["record"]["signatures"] = [{"keyid": keys.kid(identity), "sig": sig}]
    serve_instead(page, cpid, bundle)
    page.goto("/ui/")
    pin_served_anchor(page, stack)
    # Chromium's WebCrypto alone accepts this signature over the record's PAE
    accepted = page.evaluate(
        """async ([sig]) => {
          const k = await crypto.subtle.importKey('raw', new Uint8Array([1, ...new Array(31).fill(0)]),
                                                  {name: 'Ed25519'}, false, ['verify']);
          const s = Uint8Array.from(atob(sig), c => c.charCodeAt(0));
          return crypto.subtle.verify({name: 'Ed25519'}, k, s, new TextEncoder().encode('any message'));
        }""",
        [sig],
    )
    print(f"\nChromium WebCrypto accepts identity key, R = identity, S = 0: {accepted}")
    open_resource(page, cpid)
    state, text = verdict(page)
    assert state == "failed"
    assert "small-order point" in text
    # and the signature rule alone refuses it, whatever the key rule says
    why = page.evaluate(
        """async ([sig]) => {
          const v = await import('/ui/verify.js');
          const r = await v.verifyEd25519(new Uint8Array([1, ...new Array(31).fill(0)]),
                                          v.b64decode(sig), new TextEncoder().encode('x'));
          return r.ok ? 'accepted' : r.why;
        }""",
        [sig],
    )
    assert why == "public key A is a small-order point"


def test_ed25519_vectors_give_libsodiums_verdicts_in_chromium(page: Any) -> None:
    cases = json.loads((ROOT / "tests/vectors/ed25519.json").read_text())["cases"]
    page.goto("/ui/")
    wrong = page.evaluate(
        """async (cases) => {
          const v = await import('/ui/verify.js');
          const out = [];
          for (const c of cases) {
            const pub = v.hexBytes(c.public_key_hex);
            const r = await v.verifyEd25519(pub, v.hexBytes(c.signature_hex), v.hexBytes(c.message_hex));
            const key = pub.length === 32 && v.keyProblem(pub) === null ? 'accept' : 'reject';
            if ((r.ok ? 'accept' : 'reject') !== c.verify || key !== c.key.verdict) out.push(c.id);
          }
          return out;
        }""",
        cases,
    )
    assert len(cases) >= 40
    assert wrong == []


def test_a_wrong_check_character_is_shown(page: Any, stack: Stack, console: Console) -> None:
    console.allow("400")
    cpid = stack.nodes[0].cpid
    bad = cpid[:-1] + ("A" if cpid[-1] != "A" else "B")
    page.goto("/ui/")
    pin_served_anchor(page, stack)
    open_resource(page, bad)
    state, text = verdict(page)
    assert state == "failed" and "invalid_cpid" in text
    assert page.locator("#check-char").get_attribute("data-ok") == "false"
    assert f"should be {cpid[-1]}" in page.locator("#check-char").inner_text()


def test_discovery_form_ranks_like_the_api_and_the_url_is_shareable(
    page: Any, stack: Stack, browser: Any
) -> None:
    page.goto("/ui/#/discover")
    page.get_by_label("Kind").select_option("GPU")
    page.get_by_label("Near region").fill("32")
    page.get_by_label("Labels (key:value, space-separated)").fill("tier:gold")
    page.get_by_role("button", name="Search").click()
    page.wait_for_selector("#disc-results table")
    assert "kind=GPU" in page.url and "near=32" in page.url and "label=tier%3Agold" in page.url
    want = stack.get("/v1/discover?kind=GPU&near=32&label=tier:gold&limit=20")["results"]
    got = page.locator("#disc-results tbody tr td:nth-child(2)").all_inner_texts()
    assert got == [r["cpid"] for r in want] and got
    axe_clean(page)
    other = browser.new_context(base_url=stack.url).new_page()
    other.goto(page.url)
    other.wait_for_selector("#disc-results table")
    assert other.locator("#disc-results tbody tr td:nth-child(2)").all_inner_texts() == got
    assert other.get_by_label("Kind").input_value() == "GPU"
    other.context.close()
    # another order: the page asks for it, and each row says which keys ranked it
    page.get_by_label("Order").select_option("price")
    page.get_by_role("button", name="Search").click()
    page.wait_for_selector("#disc-state:has-text('order price')")
    assert "sort=price" in page.url
    want = stack.get("/v1/discover?kind=GPU&near=32&label=tier:gold&limit=20&sort=price")
    got = page.locator("#disc-results tbody tr td:nth-child(2)").all_inner_texts()
    assert got == [r["cpid"] for r in want["results"]]
    why = page.locator("#disc-results tbody tr td:nth-child(10)").all_inner_texts()
    assert why and all(w.startswith("price_cny_per_unit_hour") for w in why)
    axe_clean(page)


def test_the_checkpoint_is_verified_and_a_forged_one_is_not(page: Any, stack: Stack) -> None:
    page.goto("/ui/#/log")
    page.wait_for_selector("#log-state[data-ok]")
    assert page.locator("#log-state").get_attribute("data-ok") == "true"
    assert "Checkpoint verified in your browser" in page.locator("#log-state").inner_text()
    axe_clean(page)
    note = page.locator("#log-note").inner_text()
    forged = re.sub(r"\n(\d+)\n", lambda m: f"\n{int(m.group(1)) + 1}\n", note, count=1)
    page.route(
        "**/v1/log/checkpoint",
        lambda route: route.fulfill(status=200, content_type="text/plain", body=forged),
    )
    page.get_by_role("button", name="Verify the latest checkpoint").click()
    page.wait_for_selector("#log-state[data-ok='false']")
    assert "NOT verified" in page.locator("#log-state").inner_text()


def test_a_claim_made_in_the_page_shows_in_the_api_and_is_released(page: Any, stack: Stack) -> None:
    cpid = stack.nodes[0].cpid
    page.goto("/ui/#/claims")
    page.get_by_label("Claims token (kept in this page's memory only)").fill(stack.claims_token)
    page.get_by_role("button", name="Use token").click()
    page.wait_for_selector("#claims-state:has-text('Holder alice')")
    assert page.locator("#claims-token").input_value() == ""
    axe_clean(page)
    page.goto(f"/ui/#/discover?within={cpid.split('/')[0]}&kind=GPU")
    page.wait_for_selector("#disc-results table")
    page.locator(f'button[data-claim="{cpid}"]').click()
    page.wait_for_selector("#claims-state:has-text('Claimed'), #claims-state.bad")
    assert "Claimed 1 units" in page.locator("#claims-state").inner_text()
    claims = stack.get("/v1/claims", token=stack.claims_token)["claims"]
    assert [c["cpid"] for c in claims] == [cpid]
    claim_id = claims[0]["claim_id"]
    # the tree follows the claim through the watch: one unit of H100 claimed in CN.31.CMCC
    page.goto("/ui/#/tree")
    page.wait_for_selector('#tree li[data-prefix="CN.31.CMCC"] > .counts:has-text("1 claimed")')
    page.goto("/ui/#/claims")
    page.locator(f'button[data-release="{claim_id}"]').click()
    page.wait_for_selector(f"#claims-state:has-text('Released {claim_id}')")
    assert stack.get("/v1/claims", token=stack.claims_token)["claims"] == []
    # the token is nowhere in storage
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0


def test_phone_sized_layout_and_keyboard(browser: Any, stack: Stack) -> None:
    context = browser.new_context(
        base_url=stack.url, viewport={"width": 375, "height": 740}, is_mobile=True
    )
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.goto("/ui/")
    pin_served_anchor(pg, stack)
    for view in ("tree", f"resource/{stack.nodes[0].cpid}", "discover?kind=GPU", "claims"):
        pg.goto(f"/ui/#/{view}")
        pg.wait_for_timeout(300)
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"{view}: page is {width} px wide on a 375 px screen"
    axe_clean(pg)
    pg.goto("/ui/")
    pg.keyboard.press("Tab")
    assert pg.evaluate("document.activeElement.textContent") == "Skip to content"
    pg.keyboard.press("Enter")
    assert pg.evaluate("document.activeElement.id") == "main"
    assert errors == []
    context.close()


def _resigned(record: dict[str, Any], key: Any, **changes: Any) -> dict[str, Any]:
    env = dsse.Envelope.from_json(json.dumps(record).encode())
    payload = {**json.loads(env.payload), **changes}
    return dict(
        json.loads(dsse.sign(env.payload_type, json.dumps(payload).encode(), key).to_json())
    )


@pytest.mark.parametrize(
    ("case", "why"),
    [
        (
            "parent-issues",
            "the signer's subject CN.31 is not the CPID's prefix CN.31.CMCC (rule 1)",
        ),
        ("expired", "outside its validity window"),
        ("serial", "is not the key's serial"),
        ("kind", "the record's kind CPU is not the CPID's GPU (rule 5)"),
    ],
)
def test_validly_signed_records_that_break_a_chain_rule_are_not_verified(
    page: Any, stack: Stack, case: str, why: str
) -> None:
    """Served through ``page.route``: each record is correctly signed, so only the
    chain rules checked in the browser can refuse it."""
    cpid = stack.nodes[0].cpid
    bundle = stack.get(f"/v1/resources/{cpid}")
    cmcc = stack.pki.keys["CN.31.CMCC"]
    if case == "parent-issues":
        bundle["record"] = _resigned(bundle["record"], stack.pki.keys["CN.31"], issuer="CN.31")
        bundle["chain"] = bundle["chain"][1:]
    elif case == "expired":
        now = int(time.time())
        bundle["record"] = _resigned(
            bundle["record"], cmcc, issued_at=now - 7200, expires_at=now - 120
        )
    elif case == "serial":
        other = keys.public_to_b64url(keys.generate())
        bundle["record"] = _resigned(bundle["record"], cmcc, public_key=other)
    else:
        bundle["record"] = _resigned(bundle["record"], cmcc, kind="CPU")
    serve_instead(page, cpid, bundle)
    page.goto("/ui/")
    pin_served_anchor(page, stack)
    open_resource(page, cpid)
    state, text = verdict(page)
    assert state == "failed"
    assert why in text

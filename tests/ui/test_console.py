"""The console in headless Chromium: tree, resource verification, discovery, log, claims.

Every test starts from a fresh page on the resolver of the ``stack`` fixture and fails
on any console error (a CSP violation included) unless it allows that error by name.
"""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path
from typing import Any

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
    page.wait_for_function(
        "document.getElementById('verdict').dataset.state in {verified: 1, failed: 1}"
    )
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
    anchor = stack.get("/v1/anchor")
    assert anchor["anchors"][0]["kid"] == stack.pki.kid("CN")
    assert anchor["log_vkeys"] == [stack.vkey]


def test_tree_counts_equal_discover(page: Any, stack: Stack) -> None:
    page.goto("/ui/#/tree")
    page.wait_for_selector('#tree li[data-prefix="CN"]')
    for prefix in ("CN", "CN.31", "CN.31.CMCC", "CN.32", "CN.3"):
        want = stack.get(f"/v1/discover?within={prefix}&limit=500")["results"]
        live = sum(1 for r in want if r["live"])
        li = page.locator(f'#tree li[data-prefix="{prefix}"]').first
        assert li.get_attribute("data-count") == str(len(want)), prefix
        assert li.get_attribute("data-live") == str(live), prefix
    axe_clean(page)

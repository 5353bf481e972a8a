"""``cpi up`` creates the resolvers' usage key (0600) and publishes its ``usagesigner.v1``,
signed by the national root, where auditors find it."""

from __future__ import annotations

import stat
from pathlib import Path

from cpi.up import _usage_signer
from registry import ca, keyfile
from registry.index import Index, Keys, Prefix
from resolver.audit.usage import load_signers
from schemas import keys
from schemas.chain import TrustAnchors


async def test_usage_key_is_0600_and_its_signer_verifies_from_the_anchor(
    index: Index, tmp_path: Path
) -> None:
    root = keys.generate()
    path = tmp_path / "resolver" / "usage.key"
    await _usage_signer(index, root, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kid = keys.kid_of(keyfile.load_private(path))
    kv = await index.get(Keys.usage_signer(kid))
    assert kv is not None
    anchors = TrustAnchors([ca.make_anchor("CN", root)])
    problems: list[str] = []
    signers = load_signers([(kv.key, kv.value)], anchors, problems)
    assert list(signers) == [kid] and problems == []
    # a second run keeps the key and the statement
    await _usage_signer(index, root, path)
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

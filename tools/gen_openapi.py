"""Write docs/openapi/{registry,resolver,witness}.json: the services' OpenAPI 3.1.

Each description is what the service serves at ``GET /openapi.json``: built from the
routes of a real app (``create_app``, never started: nothing connects) and the per-route
tables of ``registry.openapi`` and ``resolver.openapi``; this script only writes them.
Output is deterministic: sorted keys, two-space indent, ASCII, trailing newline.
``--check`` writes nothing and exits 1 when a file is missing or stale.

    python tools/gen_openapi.py [--check]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from tools._generate import write_or_check  # noqa: E402

OUT_DIR = ROOT / "docs" / "openapi"


def registry_description() -> dict[str, Any]:
    from registry.config import NamespaceKey, RegistryConfig
    from registry.openapi import description
    from registry.service import create_app

    config = RegistryConfig(
        namespaces=[NamespaceKey(namespace="CN.31", key_file=Path("unused.key"))],
        anchor_file=Path("unused-anchor.json"),
    )
    return description(create_app(config).router)


def resolver_description() -> dict[str, Any]:
    from registry import ca
    from resolver.config import ResolverConfig
    from resolver.http import create_app
    from resolver.openapi import description
    from schemas import keys

    with tempfile.TemporaryDirectory() as tmp:
        anchor = Path(tmp) / "anchor.json"  # read when the app is built; not described
        anchor.write_bytes(ca.make_anchor("CN", keys.generate()).to_json())
        return description(create_app(ResolverConfig(anchor_files=[anchor])).router)


def witness_description() -> dict[str, Any]:
    from resolver.audit.witness import Witness, WitnessState, create_witness_app, description
    from schemas import keys

    with tempfile.TemporaryDirectory() as tmp:
        state = WitnessState(tmp)
        try:
            app = create_witness_app(Witness("w", keys.generate(), {}, state))
            return description(app.router)
        finally:
            state.close()


def build() -> dict[str, str]:
    """File name -> file text, for both services."""
    from schemas.openapi import render

    return {
        "registry.json": render(registry_description()),
        "resolver.json": render(resolver_description()),
        "witness.json": render(witness_description()),
    }


def main(argv: list[str] | None = None) -> int:
    return write_or_check(
        build(),
        out_dir=OUT_DIR,
        root=ROOT,
        script="tools/gen_openapi.py",
        doc=__doc__ or "",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())

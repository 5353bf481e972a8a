"""Write schemas/json/<type>.json: the JSON Schema of every document type.

The schemas come from ``schemas.jsonschema`` (generated from the pydantic models);
this script only writes them.  Output is deterministic: sorted keys, two-space
indent, ASCII, trailing newline.  ``--check`` writes nothing and exits 1 when a file
is missing or stale.

    python tools/gen_schemas.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from schemas.jsonschema import json_schemas, render  # noqa: E402
from tools._generate import write_or_check  # noqa: E402

OUT_DIR = ROOT / "schemas" / "json"


def build() -> dict[str, str]:
    """File name -> file text, for every schema."""
    return {f"{t}.json": render(s) for t, s in json_schemas().items()}


def main(argv: list[str] | None = None) -> int:
    return write_or_check(
        build(),
        out_dir=OUT_DIR,
        root=ROOT,
        script="tools/gen_schemas.py",
        doc=__doc__ or "",
        argv=argv,
    )


if __name__ == "__main__":
    sys.exit(main())

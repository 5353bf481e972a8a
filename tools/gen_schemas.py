"""Write schemas/json/<type>.json: the JSON Schema of every document type.

The schemas come from ``schemas.jsonschema`` (generated from the pydantic models);
this script only writes them.  Output is deterministic: sorted keys, two-space
indent, ASCII, trailing newline.  ``--check`` writes nothing and exits 1 when a file
is missing or stale.

    python tools/gen_schemas.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from schemas.jsonschema import json_schemas, render  # noqa: E402

OUT_DIR = ROOT / "schemas" / "json"


def build() -> dict[str, str]:
    """File name -> file text, for every schema."""
    return {f"{t}.json": render(s) for t, s in json_schemas().items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale files")
    args = ap.parse_args(argv)
    stale = []
    for name, text in build().items():
        path = OUT_DIR / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
            print(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run: python tools/gen_schemas.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

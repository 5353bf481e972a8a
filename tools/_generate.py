"""Write generated files, or with ``--check`` only report the stale ones (shared by tools/gen_*.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_or_check(
    files: dict[str, str],
    *,
    out_dir: Path,
    root: Path,
    script: str,
    doc: str,
    argv: list[str] | None,
) -> int:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale files")
    args = ap.parse_args(argv)
    stale = []
    for name, text in files.items():
        path = out_dir / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8", newline="\n")
            print(f"wrote {path.relative_to(root)}")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run: python {script}", file=sys.stderr)
        return 1
    return 0

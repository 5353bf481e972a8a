"""The resolver package's public surface, and what a verification worker imports."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import resolver

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves_to_its_home() -> None:
    assert sorted(resolver.__all__) == sorted(set(resolver.__all__))
    for name in resolver.__all__:
        value = getattr(resolver, name)
        home = importlib.import_module(value.__module__)
        assert getattr(home, name) is value


def test_a_verification_worker_imports_neither_etcd_nor_aiohttp() -> None:
    code = (
        "import sys, resolver.verify\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('etcd3aio', 'grpc', 'aiohttp', 'registry')]\n"
        "print(','.join(sorted(bad)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == ""

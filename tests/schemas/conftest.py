"""Shared setup for the schemas tests.

``tools/`` is a directory of scripts, not an installed package; the chain tests build
their documents with ``tools/gen_vectors.py``, so the repository root goes on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

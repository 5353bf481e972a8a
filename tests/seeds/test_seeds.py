"""Seed files are package data: found through ``seeds.path``, shipped in the wheel, and a
configured file that is missing is a ConfigError, never a silent fallback."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import seeds
from cpi.up import UpOptions, up
from resolver.config import ResolverConfig
from resolver.core import Resolver
from resolver.discovery import LatencyTable
from schemas.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "registry", "resolver", "cpi", "seeds")


def test_shipped_files_are_found_and_parse() -> None:
    tree = json.loads(seeds.path(seeds.NAMESPACES).read_text(encoding="utf-8"))
    assert tree["root"]["prefix"] == "CN"
    assert len(tree["regions"]) == 13 and len(tree["industry"]) == 17
    table = LatencyTable.from_file(seeds.path(seeds.LATENCY))
    assert set(table.regions) == {r["code"] for r in tree["regions"]}
    assert seeds.path(seeds.LATENCY).parent == Path(seeds.__file__).parent


def test_a_missing_seed_file_names_its_path() -> None:
    expected = Path(seeds.__file__).parent / "nope.json"
    with pytest.raises(ConfigError, match=f"^seed file {re.escape(str(expected))}: no such file$"):
        seeds.path("nope.json")


def test_wheel_contains_the_seed_files(tmp_path: Path) -> None:
    """Build a wheel from a copy of the sources (the checkout stays clean) and look inside."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--wheel-dir", str(out), str(src)], check=True, timeout=120)
    [wheel] = out.glob("cpi_registry-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in (seeds.NAMESPACES, seeds.LATENCY):
            assert f"seeds/{name}" in names
            assert zf.read(f"seeds/{name}") == seeds.path(name).read_bytes()
    assert {"seeds/__init__.py", "seeds/README.md"} <= names


def test_a_missing_configured_latency_table_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "latency.json"
    error = f"^latency table {re.escape(str(missing))}: no such file$"
    config = ResolverConfig(anchor_files=[tmp_path / "anchor.json"], latency_table=missing)
    with pytest.raises(ConfigError, match=error):
        config.latency_table_path()
    with pytest.raises(ConfigError, match=error):
        Resolver.from_config(config)


def test_the_default_latency_table_is_the_shipped_one(tmp_path: Path) -> None:
    config = ResolverConfig(anchor_files=[tmp_path / "anchor.json"])
    assert config.latency_table_path() == seeds.path(seeds.LATENCY)


def test_cpi_up_refuses_missing_seeds_before_starting_anything(tmp_path: Path) -> None:
    missing = tmp_path / "namespaces.json"
    data = tmp_path / "data"
    with pytest.raises(
        ConfigError, match=f"^namespace seeds {re.escape(str(missing))}: no such file$"
    ):
        up(UpOptions(data_dir=data, seeds=missing))
    assert not data.exists()
    assert UpOptions(data_dir=data).seeds == seeds.path(seeds.NAMESPACES)

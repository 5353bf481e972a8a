"""registry.index.settings: the ``etcd`` config section and the environment over it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from cpi.commands._etcd import etcd_argument
from registry.index import EtcdSettings, endpoints_from_env

FILE = {"etcd": {"endpoints": ["file:1"]}}


def _layered(env: dict[str, str]) -> list[str]:
    raw: dict[str, Any] = {"etcd": dict(FILE["etcd"])}
    EtcdSettings.layer(raw, base=Path("/"), env=env)
    return list(EtcdSettings.model_validate(raw["etcd"]).endpoints)


@pytest.mark.parametrize(
    ("env", "endpoints"),
    [
        ({}, ["file:1"]),
        ({"CPI_ETCD_ENDPOINTS": "a:1, b:2"}, ["a:1", "b:2"]),
        ({"CPI_ETCD": "c:3,d:4"}, ["c:3", "d:4"]),  # the other name of the same setting
        ({"CPI_ETCD_ENDPOINTS": "a:1", "CPI_ETCD": "c:3"}, ["a:1"]),  # the documented one wins
        ({"CPI_ETCD_ENDPOINTS": "", "CPI_ETCD": "c:3"}, ["c:3"]),  # empty counts as unset
    ],
)
def test_both_names_set_the_endpoints_of_a_service_config(
    env: dict[str, str], endpoints: list[str]
) -> None:
    assert _layered(env) == endpoints


@pytest.mark.parametrize(
    ("env", "etcd"),
    [
        ({"CPI_ETCD_ENDPOINTS": "a:1"}, "a:1"),
        ({"CPI_ETCD": "c:3"}, "c:3"),
        ({"CPI_ETCD_ENDPOINTS": "a:1", "CPI_ETCD": "c:3"}, "a:1"),
    ],
)
def test_both_names_default_the_etcd_flag(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], etcd: str
) -> None:
    monkeypatch.delenv("CPI_ETCD_ENDPOINTS", raising=False)
    monkeypatch.delenv("CPI_ETCD", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    etcd_argument(parser)
    assert parser.parse_args([]).etcd == etcd
    assert parser.parse_args(["--etcd", "x:9"]).etcd == "x:9"


def test_the_etcd_flag_is_required_without_either_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CPI_ETCD_ENDPOINTS", raising=False)
    monkeypatch.delenv("CPI_ETCD", raising=False)
    assert endpoints_from_env({}) is None
    parser = argparse.ArgumentParser()
    etcd_argument(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "--etcd" in capsys.readouterr().err

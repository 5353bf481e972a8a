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


def test_password_file_and_user_from_the_environment(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    raw: dict[str, Any] = {"etcd": {"endpoints": ["a:1"], "password": "in-file"}}
    EtcdSettings.layer(
        raw, base=tmp_path, env={"CPI_ETCD_USER": "bob", "CPI_ETCD_PASSWORD_FILE": str(pw)}
    )
    s = EtcdSettings.model_validate(raw["etcd"])
    assert s.user == "bob" and s.password is None and s.password_value() == "s3cret"
    raw = {"etcd": {"user": "u", "password_file": "pw"}}
    EtcdSettings.layer(raw, base=tmp_path, env={"CPI_ETCD_PASSWORD": "env"})
    assert EtcdSettings.model_validate(raw["etcd"]).password_value() == "env"
    raw = {"etcd": {"user": "u", "password_file": "pw"}}
    EtcdSettings.layer(raw, base=tmp_path, env={})
    s = EtcdSettings.model_validate(raw["etcd"])
    assert s.password_file == pw and s.password_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_credentials_of_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cpi.commands._etcd import credentials

    for name in ("CPI_ETCD_USER", "CPI_ETCD_PASSWORD", "CPI_ETCD_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CPI_ETCD_ENDPOINTS", "a:1")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    parser = argparse.ArgumentParser()
    etcd_argument(parser)
    assert credentials(parser.parse_args([])) == (None, None)
    args = parser.parse_args(["--user", "root", "--password-file", str(pw)])
    assert credentials(args) == ("root", "s3cret")
    monkeypatch.setenv("CPI_ETCD_PASSWORD", "from-env")
    assert credentials(parser.parse_args(["--user", "root"])) == ("root", "from-env")

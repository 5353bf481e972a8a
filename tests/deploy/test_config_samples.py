"""deploy/config/: each sample loads through the real loader, and the sample, its
documentation and the options the service has are the same set (no drift)."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from cpi.main import build_parser
from registry.config import RegistryConfig
from registry.config import load_config as load_registry_config
from resolver.config import ResolverConfig
from resolver.config import load_config as load_resolver_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "config"


def model_options(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every option of a config model, nested ones dotted (``etcd.user``,
    ``namespaces[].key_file``)."""
    out: set[str] = set()
    for name, info in model.model_fields.items():
        inner = _model_in(info.annotation)
        if inner is None:
            out.add(prefix + name)
        else:
            model_cls, is_list = inner
            out |= model_options(model_cls, f"{prefix}{name}{'[]' if is_list else ''}.")
    return out


def _model_in(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(item, type) and issubclass(item, BaseModel):
            return item, True
    return None


def sample_options(obj: dict[str, Any], prefix: str = "") -> set[str]:
    """The options a JSON sample sets, dotted the same way."""
    out: set[str] = set()
    for key, value in obj.items():
        if isinstance(value, dict):
            out |= sample_options(value, f"{prefix}{key}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                out |= sample_options(item, f"{prefix}{key}[].")
        else:
            out.add(prefix + key)
    return out


def documented(section: str) -> list[str]:
    """The options in the table under ``## <section>`` of deploy/config/README.md."""
    text = (CONFIG / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", body, flags=re.M)


CASES = [
    ("registry.json", RegistryConfig, load_registry_config),
    ("resolver.json", ResolverConfig, load_resolver_config),
]


@pytest.mark.parametrize(("sample", "model", "load"), CASES)
def test_json_sample_documents_every_option(sample: str, model: type[BaseModel], load: Any) -> None:
    path = CONFIG / sample
    config = load(path, env={})  # the real loader, without this machine's environment
    assert isinstance(config, model)
    options = model_options(model)
    assert sample_options(json.loads(path.read_text())) == options, "sample vs model"
    docs = documented(sample)
    assert len(docs) == len(set(docs)), "an option documented twice"
    assert set(docs) == options, "README.md vs model"
    # nothing in the sample is left to a default the model would fill differently
    assert config.model_dump(mode="json") == model.model_validate(
        json.loads(path.read_text())
    ).model_dump(mode="json")


def test_samples_are_production_shaped() -> None:
    registry = load_registry_config(CONFIG / "registry.json", env={})
    resolver = load_resolver_config(CONFIG / "resolver.json", env={})
    for config in (registry, resolver):
        assert len(config.etcd.endpoints) == 3, "all members of the etcd cluster"
        assert config.etcd.ca_cert is not None and config.etcd.password is None
        assert config.etcd.user and config.etcd.password_file is not None
        assert str(config.etcd.password_file).startswith("/run/credentials/")
    assert all(str(n.key_file).startswith("/run/credentials/") for n in registry.namespaces)
    assert registry.instance_id == "registry-1"  # fixed, not <hostname>-<pid>
    assert resolver.dns_port == 53


def flags_of(*command: str) -> set[str]:
    parser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if a.dest.endswith("command"))
        parser = sub.choices[word]  # type: ignore[index]
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


@pytest.mark.parametrize(
    ("sample", "command"), [("logsigner.env", ("log", "sign")), ("agent.env", ("agent", "run"))]
)
def test_env_sample_documents_every_flag(sample: str, command: tuple[str, ...]) -> None:
    text = (CONFIG / sample).read_text()
    documented_flags = re.findall(r"^#\s*flag: (--[a-z-]+)\s", text, flags=re.M)
    assert len(documented_flags) == len(set(documented_flags)), "a flag documented twice"
    assert set(documented_flags) == flags_of(*command)
    # every variable set is used by the unit (tests/deploy/test_systemd.py runs them)
    unit = (ROOT / "deploy" / "systemd" / f"cpi-{sample.removesuffix('.env')}.service").read_text()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name = line.partition("=")[0]
            assert name.startswith("CPI_ETCD_") or f"${{{name}}}" in unit or f"${name}" in unit

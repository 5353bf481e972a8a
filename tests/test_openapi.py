"""The OpenAPI descriptions: generated from the routes, published fresh, served as published.

The fuzzing against live services is in ``tests/fuzz/test_schemathesis.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from registry import openapi as registry_openapi
from resolver import openapi as resolver_openapi
from schemas import api
from schemas.openapi import Operation, Reply, build, routes_of
from tools import gen_openapi

DOCS = Path(__file__).resolve().parents[1] / "docs" / "openapi"


def test_published_descriptions_are_fresh() -> None:
    assert gen_openapi.main(["--check"]) == 0, "run: python tools/gen_openapi.py"


@pytest.mark.parametrize(
    ("name", "describe"),
    [
        ("registry", gen_openapi.registry_description),
        ("resolver", gen_openapi.resolver_description),
    ],
)
def test_every_route_of_the_app_is_described(name: str, describe: Any) -> None:
    doc = describe()
    assert doc["openapi"] == "3.1.0"
    assert doc == json.loads((DOCS / f"{name}.json").read_text())
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            statuses = set(op["responses"])
            assert statuses, f"{method} {path} documents no answer"
            assert "default" not in statuses, "no catch-all answers"
            for status, reply in op["responses"].items():
                if int(status) >= 400:  # every error is the error body...
                    schema = reply["content"]["application/json"]["schema"]
                    # ...except the resolver's 503 /readyz: its health, with "error" in it
                    model = (
                        "ResolverReady" if (name, path) == ("resolver", "/readyz") else "ErrorBody"
                    )
                    assert schema == {"$ref": f"#/components/schemas/{model}"}


def test_the_tables_name_only_real_routes() -> None:
    table = registry_openapi.OPERATIONS
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/healthz", handler)
    with pytest.raises(ValueError, match="descriptions of routes the app does not have"):
        registry_openapi.description(app.router)
    app.router.add_get("/v1/not-described", handler)
    with pytest.raises(ValueError, match=r"routes without an OpenAPI description.*not-described"):
        build(title="t", version="1", description="", routes=routes_of(app.router), table=table)


def test_routes_of_skips_head_and_catch_all_and_uses_templates() -> None:
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/v1/resources/{cpid:.+}", handler)
    app.router.add_route("*", "/{path:.*}", handler)
    assert routes_of(app.router) == [("GET", "/v1/resources/{cpid}")]


def test_bodies_come_from_the_pydantic_models() -> None:
    doc = gen_openapi.resolver_description()
    schemas = doc["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error"]
    assert schemas["ClaimCreated"]["additionalProperties"] is False
    # the document models keep the syntax schemas.jsonschema adds to them
    assert "pattern" in schemas["Record"]["properties"]["public_key"]
    one = build(
        title="t",
        version="1",
        description="",
        routes=[("GET", "/x")],
        table={("GET", "/x"): Operation("x", {200: Reply("ok", api.Health)}, errors=(503,))},
    )
    assert set(one["components"]["schemas"]) == {"ErrorBody", "ErrorDetail", "Health"}
    assert set(resolver_openapi.OPERATIONS) == {
        (m.upper(), p) for p, ops in doc["paths"].items() for m in ops
    }

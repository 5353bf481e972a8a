"""Property-based fuzzing of both HTTP services from their own OpenAPI descriptions.

schemathesis reads ``/openapi.json`` from a live registry and resolver (real etcd, real
ports: :mod:`tests.fuzz.stack`) and, for every operation, sends ``MAX_EXAMPLES`` requests
drawn from the description (valid and invalid data, with and without the right tokens,
known and random CPIDs).  Every answer must be no 5xx, have a documented status, content
type and headers, and a body matching its schema.  The one exception: ``GET /v1/watch``
answers an endless ``text/event-stream``, so on 200 only its status and content type
are checked, not the body (its events are specified in docs/resolver.md).

Hypothesis runs derandomized (a fixed seed per test), without its example database and
without deadlines, so a run is repeatable.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from cpi.etcdproc import EtcdProcess
from tests.fuzz.stack import GPUS, Stack
from tests.registry.service_kit import Node

MAX_EXAMPLES = int(os.environ.get("CPI_FUZZ_EXAMPLES", "25"))
"""Examples per operation; set CPI_FUZZ_EXAMPLES for a deeper run than CI's."""
TIMEOUT_S = 10.0
DOCS = Path(__file__).resolve().parents[2] / "docs" / "openapi"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
]
MAX_COVERAGE = 60
"""At most this many coverage-phase cases per operation (they come in a fixed order)."""
STATUSES: dict[str, collections.Counter[int]] = {}
"""Statuses seen per operation (printed at the end of the module with ``-s``)."""
SSE = ("GET", "/v1/watch")
SSE_READ_S = 1.0


def _operations(service: str) -> list[tuple[str, str]]:
    doc = json.loads((DOCS / f"{service}.json").read_text())
    return [(m.upper(), p) for p, ops in doc["paths"].items() for m in ops]


@pytest.fixture(scope="module")
def stack(etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(etcd_server.endpoint, tmp_path_factory.mktemp("fuzz"))
    s.start()
    try:
        yield s
    finally:
        s.stop()
        for op, seen in sorted(STATUSES.items()):
            print(f"{op}: {dict(sorted(seen.items()))}")


@pytest.fixture(scope="module")
def schemas(stack: Stack) -> dict[str, Any]:
    return {
        name: schemathesis.openapi.from_url(f"{url}/openapi.json")
        for name, url in (("registry", stack.registry), ("resolver", stack.resolver))
    }


def _strategy(op: Any, stack: Stack, service: str) -> st.SearchStrategy[Any]:
    """Random cases, plus cases with the right token and known path values."""
    options = [
        op.as_strategy(generation_mode=GenerationMode.POSITIVE),
        op.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    secured = "security" in op.definition.raw
    if secured:
        token = {
            ("registry", "/v1/registrations"): stack.join_token,
            ("registry", "/v1/admin/self-preservation"): stack.admin_token,
        }.get((service, op.path), stack.claims_token)
        options.append(op.as_strategy(headers={"Authorization": f"Bearer {token}"}))
    if (service, op.method.upper(), op.path) == ("resolver", "POST", "/v1/claims"):
        auth = {"Authorization": f"Bearer {stack.claims_token}"}
        options += [op.as_strategy(headers=auth, body={"cpid": c, "units": 1}) for c in stack.cpids]
    if service == "registry":
        options += _signed(op, stack)
    if "{cpid}" in op.path:
        options += [op.as_strategy(path_parameters={"cpid": c}) for c in stack.cpids]
    return st.one_of(options)


def _signed(op: Any, stack: Stack) -> list[st.SearchStrategy[Any]]:
    """Registry cases with properly signed bodies (the first is accepted, the same body
    again is a replay): a new node, a status, the deregistration of ``stack.doomed``."""
    route = (op.method.upper(), op.path)
    if route == ("POST", "/v1/registrations"):
        auth = {"Authorization": f"Bearer {stack.join_token}"}
        bodies = [Node().register(attributes=GPUS) for _ in range(2)]
        bodies.append(stack.nodes[0].register(attributes=GPUS))  # the same key again: 200
        return [op.as_strategy(headers=auth, body=json.loads(b)) for b in bodies]
    if route == ("PUT", "/v1/resources/{cpid}/status"):
        return [
            op.as_strategy(path_parameters={"cpid": n.cpid}, body=json.loads(n.status(free=2)))
            for n in stack.nodes
        ]
    if route == ("DELETE", "/v1/resources/{cpid}"):
        assert stack.doomed is not None
        body = json.loads(stack.doomed.deregister())
        return [op.as_strategy(path_parameters={"cpid": stack.doomed.cpid}, body=body)]
    return []


def _fuzz(schemas: dict[str, Any], stack: Stack, service: str, method: str, path: str) -> None:
    op = schemas[service][path][method]
    base = stack.registry if service == "registry" else stack.resolver

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_strategy(op, stack, service))
    def run(case: Any) -> None:
        _call(case, base, method, path)

    run()
    # schemathesis' coverage phase: boundary and invalid values of each parameter, and
    # methods the description does not list (deterministic, no randomness)
    schema = schemas[service]
    cases = schema.iter_coverage_cases(
        op,
        generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        generation_config=schema.config.generation_for(operation=op, phase="coverage"),
    )
    for case in itertools.islice(cases, MAX_COVERAGE):
        _call(case, base, method, path)


def _call(case: Any, base: str, method: str, path: str) -> None:
    # the watch stream is endless: schemathesis reads its events for SSE_READ_S, then hangs up
    timeout = SSE_READ_S if (method, path) == SSE else TIMEOUT_S
    response = case.call_and_validate(base_url=base, checks=CHECKS, timeout=timeout)
    STATUSES.setdefault(f"{method} {path}", collections.Counter())[response.status_code] += 1


@pytest.mark.parametrize(("method", "path"), _operations("registry"))
def test_registry_answers_as_described(
    schemas: dict[str, Any], stack: Stack, method: str, path: str
) -> None:
    _fuzz(schemas, stack, "registry", method, path)


@pytest.mark.parametrize(("method", "path"), _operations("resolver"))
def test_resolver_answers_as_described(
    schemas: dict[str, Any], stack: Stack, method: str, path: str
) -> None:
    _fuzz(schemas, stack, "resolver", method, path)


@pytest.mark.parametrize("service", ["registry", "resolver"])
def test_the_services_serve_the_published_description(stack: Stack, service: str) -> None:
    base = stack.registry if service == "registry" else stack.resolver
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=TIMEOUT_S) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        served = json.load(resp)
    assert served == json.loads((DOCS / f"{service}.json").read_text())


def _ask(method: str, url: str) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return resp.status, dict(resp.headers), json.load(resp)
    except urllib.error.HTTPError as exc:
        assert exc.headers["Content-Type"].startswith("application/json"), exc.headers
        return exc.code, dict(exc.headers), json.load(exc)


def test_what_the_fuzzer_found_stays_fixed(stack: Stack) -> None:
    """Each of these once answered otherwise (see the commit that fixed it)."""
    # 405 without Allow (RFC 9110 requires it), on both services
    for base in (stack.registry, stack.resolver):
        status, headers, body = _ask("DELETE", f"{base}/healthz")
        assert (status, body["error"]["code"]) == (405, "method_not_allowed")
        assert "GET" in headers["Allow"]
    # DELETE .../status was read as the deregistration of the CPID "<cpid>/status" (400)
    status, headers, _ = _ask("DELETE", f"{stack.registry}/v1/resources/{stack.cpids[0]}/status")
    assert status == 405 and headers["Allow"] == "PUT"
    # a newline in the path fell through every route to aiohttp's text/plain 404
    status, _, body = _ask("GET", f"{stack.resolver}/v1/resources/CN.31%0A")
    assert (status, body["error"]["code"]) == (400, "invalid_cpid")
    status, _, body = _ask("GET", f"{stack.resolver}/v1/%0A")
    assert (status, body["error"]["code"]) == (404, "not_found")
    # an empty integer parameter was read as an absent one
    url = f"{stack.resolver}/v1/log/proof/consistency?first=0&second="
    status, _, body = _ask("GET", url)
    assert (status, body["error"]["code"]) == (400, "invalid_query")

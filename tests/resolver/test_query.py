"""The discovery query alone: its URL form, by table and by hypothesis."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resolver.discovery import Query
from resolver.errors import QueryError
from schemas.cpid import KINDS


@pytest.mark.parametrize(
    ("query", "params"),
    [
        (Query(), [("limit", "20")]),
        (Query(kind="CPU", limit=3), [("kind", "CPU"), ("limit", "3")]),
        (Query(within="cn.31.cmcc"), [("within", "CN.31.CMCC"), ("limit", "20")]),
        (Query(accelerator=" H100 "), [("accelerator", "h100"), ("limit", "20")]),
        (
            Query(near="31", max_latency_ms=12.345678901),
            [("near", "31"), ("max_latency_ms", "12.345678901"), ("limit", "20")],
        ),
        (
            Query(near="3101", max_latency_ms=5),
            [("near", "3101"), ("max_latency_ms", "5"), ("limit", "20")],
        ),
        (
            Query(labels=(("tier", "gold"), ("zone", "a:b")), live=False, min_free=0),
            [
                ("min_free", "0"),
                ("label", "tier:gold"),
                ("label", "zone:a:b"),
                ("live", "false"),
                ("limit", "20"),
            ],
        ),
    ],
)
def test_url_parameters_of_a_query(query: Query, params: list[tuple[str, str]]) -> None:
    assert query.to_params() == params
    assert query.to_params(with_limit=False) == params[:-1]
    assert Query.from_params(params) == query


def test_limit_above_the_maximum_is_refused_by_the_parser_only() -> None:
    q = Query(limit=1000)
    with pytest.raises(QueryError, match="between 1 and 500"):
        Query.from_params(q.to_params())
    assert Query.from_params(q.to_params(), max_limit=1000) == q


_NAMESPACES = ["CN", "CN.31", "CN.31.CMCC", "CN.3", "CN.11.UNICOM.BJ"]
_LABEL_KEY = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._/-", min_size=1, max_size=63)
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)


@st.composite
def queries(draw: st.DrawFn) -> Query:
    near = draw(st.none() | st.from_regex(r"[0-9]{2}|[0-9]{4}|[0-9]{6}", fullmatch=True))
    latency = None
    if near is not None:
        latency = draw(
            st.none()
            | st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)
        )
    accelerator = draw(st.none() | _TEXT.filter(lambda t: bool(t.strip())))
    within = draw(st.none() | st.sampled_from(_NAMESPACES))
    if within is not None and draw(st.booleans()):
        within = within.lower()
    return Query(
        kind=draw(st.none() | st.sampled_from(KINDS)),
        within=within,
        accelerator=accelerator,
        min_free=draw(st.none() | st.integers(min_value=0, max_value=10**12)),
        near=near,
        max_latency_ms=latency,
        labels=tuple(draw(st.lists(st.tuples(_LABEL_KEY, _TEXT), max_size=4))),
        live=draw(st.none() | st.booleans()),
        limit=draw(st.integers(min_value=1, max_value=500)),
    )


@given(queries())
def test_a_query_round_trips_through_its_url_form(q: Query) -> None:
    url = urlencode(q.to_params())
    assert Query.from_params(parse_qsl(url, keep_blank_values=True)) == q


@given(queries())
def test_without_the_limit_the_default_applies(q: Query) -> None:
    back = Query.from_params(q.to_params(with_limit=False), default_limit=q.limit)
    assert back == q

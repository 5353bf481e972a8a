"""Response rate limiting alone: prefixes and token buckets on an injected clock."""

from __future__ import annotations

import pytest

from resolver.dns.rrl import DROP, SEND, SLIP, RateLimiter, prefix_of

S, D, L = SEND, DROP, SLIP


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("192.0.2.1", "192.0.2.254", True),  # one /24
        ("192.0.2.1", "192.0.3.1", False),
        ("127.0.0.1", "127.0.0.2", True),
        ("::ffff:192.0.2.7", "192.0.2.9", True),  # IPv4-mapped counts as IPv4
        ("2001:db8:0:ab::1", "2001:db8:0:cd:ffff::1", True),  # one /56
        ("2001:db8:0:ab::1", "2001:db8:0:1ab::1", False),  # the 56th bit differs
        ("fe80::1%eth0", "fe80::2", True),  # the zone is ignored
        ("2001:db8::1", "192.0.2.1", False),
    ],
)
def test_prefixes(a: str, b: str, same: bool) -> None:
    assert (prefix_of(a) == prefix_of(b)) is same


@pytest.mark.parametrize(
    ("rate", "slip", "steps", "expected"),
    [
        # a full bucket of 3, then limited: every 2nd limited response slips
        (3, 2, [0.0] * 8, [S, S, S, D, L, D, L, D]),
        # slip 0 drops all, slip 1 slips all
        (2, 0, [0.0] * 5, [S, S, D, D, D]),
        (2, 1, [0.0] * 5, [S, S, L, L, L]),
        # refill at `rate` tokens a second: one more token every 1/rate s
        (4, 2, [0.0] * 5 + [0.25, 0.25, 0.5], [S, S, S, S, D, S, L, S]),
        # the bucket holds at most one second's worth, however long the pause
        (2, 1, [0.0, 0.0, 100.0, 100.0, 100.0], [S, S, S, S, L]),
    ],
)
def test_token_buckets(rate: int, slip: int, steps: list[float], expected: list[int]) -> None:
    rrl = RateLimiter(rate, slip)
    got = [rrl.check("192.0.2.1", t) for t in steps]
    assert got == expected
    limited = sum(v != S for v in expected)
    slipped = sum(v == L for v in expected)
    assert rrl.stats() == {
        "rrl_limited": limited,
        "rrl_slipped": slipped,
        "rrl_dropped": limited - slipped,
        "rrl_prefixes": 1,
    }


def test_prefixes_have_their_own_buckets() -> None:
    rrl = RateLimiter(1, 0)
    assert rrl.check("192.0.2.1", 0.0) == S
    assert rrl.check("192.0.2.99", 0.0) == D  # same /24
    assert rrl.check("192.0.3.1", 0.0) == S
    assert rrl.check("2001:db8:0:ab::1", 0.0) == S
    assert rrl.check("2001:db8:0:ab::2", 0.0) == D  # same /56
    assert rrl.check("2001:db8:0:1ab::1", 0.0) == S


def test_the_table_is_bounded() -> None:
    rrl = RateLimiter(5, 2, max_prefixes=4)
    for i in range(4):
        rrl.check(f"10.0.{i}.1", 0.0)
    assert len(rrl) == 4
    rrl.check("10.0.0.1", 5.0)  # busy again
    rrl.check("10.0.9.1", 5.0)  # full: the buckets idle for >= 1 s go
    assert len(rrl) == 2
    for i in range(10):
        rrl.check(f"10.1.{i}.1", 5.0)  # all busy: the table is cleared when full
        assert len(rrl) <= 4


@pytest.mark.parametrize(("rate", "slip"), [(0, 2), (-1, 2), (5, -1)])
def test_bad_settings(rate: int, slip: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, slip)


def test_the_last_clients_bucket_is_forgotten_with_the_table() -> None:
    rrl = RateLimiter(1, 0, max_prefixes=2)
    assert rrl.check("10.0.0.1", 0.0) == S
    assert rrl.check("10.0.0.1", 0.0) == D  # the fast path: same host as last time
    assert rrl.check("10.0.1.1", 0.0) == S
    assert rrl.check("10.0.2.1", 0.0) == S  # full and all busy: cleared
    assert len(rrl) == 1
    assert rrl.check("10.0.2.1", 0.0) == D
    assert rrl.check("10.0.0.1", 0.0) == S  # a new bucket, not the one cleared away
    assert len(rrl) == 2

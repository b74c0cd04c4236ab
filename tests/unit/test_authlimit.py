"""Tests for pymta.core.authlimit: failed-login delays and refusal, fake clock."""

import types

import pytest

from pymta.core.authlimit import AuthThrottle, Penalty, client_key


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


def test_delays_grow_and_are_capped(clock):
    throttle = AuthThrottle(limit=100, penalty_time=300, clock=clock)
    delays = [throttle.failure("192.0.2.1").delay for _ in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]


def test_refused_after_limit_within_window(clock):
    throttle = AuthThrottle(limit=5, penalty_time=300, clock=clock)
    for n in range(1, 5):
        penalty = throttle.failure("192.0.2.1")
        assert penalty.failures == n and penalty.refused_for == 0.0
        clock.advance(10)
    assert throttle.refused_for("192.0.2.1") == 0.0
    penalty = throttle.failure("192.0.2.1")
    assert penalty == Penalty(delay=15.0, failures=5, refused_for=300.0)
    assert throttle.refused_for("192.0.2.1") == 300.0
    assert throttle.refused_for("192.0.2.2") == 0.0
    clock.advance(299)
    assert throttle.refused_for("192.0.2.1") == pytest.approx(1.0)
    clock.advance(1)
    assert throttle.refused_for("192.0.2.1") == 0.0


def test_failures_outside_the_window_do_not_count(clock):
    throttle = AuthThrottle(limit=3, penalty_time=60, clock=clock)
    for _ in range(10):
        assert throttle.failure("192.0.2.1").refused_for == 0.0
        clock.advance(31)
    assert throttle.refused_for("192.0.2.1") == 0.0


def test_quiet_client_starts_over(clock):
    throttle = AuthThrottle(limit=10, penalty_time=60, clock=clock)
    for _ in range(3):
        throttle.failure("192.0.2.1")
    clock.advance(60)
    penalty = throttle.failure("192.0.2.1")
    assert (penalty.delay, penalty.failures) == (1.0, 1)


def test_success_resets_delay_but_not_the_count(clock):
    throttle = AuthThrottle(limit=4, penalty_time=300, clock=clock)
    for _ in range(3):
        throttle.failure("192.0.2.1")
    throttle.success("192.0.2.1")
    penalty = throttle.failure("192.0.2.1")
    assert penalty.delay == 1.0
    assert penalty.refused_for == 300.0
    throttle.success("198.51.100.7")        # unknown client: nothing to do
    assert len(throttle) == 1


def test_refusal_is_not_extended_by_failures_while_refused(clock):
    throttle = AuthThrottle(limit=2, penalty_time=100, clock=clock)
    throttle.failure("192.0.2.1")
    assert throttle.failure("192.0.2.1").refused_for == 100
    clock.advance(50)
    assert throttle.failure("192.0.2.1").refused_for == 0.0
    assert throttle.refused_for("192.0.2.1") == 50


@pytest.mark.parametrize("address,key", [
    ("192.0.2.1", "192.0.2.1"),
    ("[192.0.2.1]", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("[IPv6:2001:db8:1:2::99]", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("unknown", "unknown"),
    ("/run/sock" + "x" * 100, ("/run/sock" + "x" * 100)[:64]),
])
def test_client_keys(address, key):
    assert client_key(address) == key


def test_ipv6_clients_share_their_64(clock):
    throttle = AuthThrottle(limit=3, penalty_time=300, clock=clock)
    throttle.failure("2001:db8::1")
    throttle.failure("2001:db8::2")
    assert throttle.failure("2001:db8::ffff:3").refused_for == 300
    assert throttle.refused_for("2001:db8::abcd") == 300
    assert throttle.refused_for("2001:db8:0:1::1") == 0.0
    exact = AuthThrottle(limit=2, ipv6_prefix=128, clock=clock)
    exact.failure("2001:db8::1")
    assert exact.failure("2001:db8::2").refused_for == 0.0


def test_memory_is_bounded_least_recent_first(clock):
    throttle = AuthThrottle(limit=2, penalty_time=300, max_clients=100, clock=clock)
    throttle.failure("10.0.0.0")
    for n in range(1, 500):
        throttle.failure(f"10.0.{n // 256}.{n % 256}")
        clock.advance(0.01)
    assert len(throttle) == 100
    assert throttle.failure("10.0.1.243").refused_for == 300     # recent ones kept
    assert throttle.failure("10.0.0.0").refused_for == 0.0       # oldest forgotten


def test_expired_clients_are_pruned(clock):
    throttle = AuthThrottle(limit=5, penalty_time=60, clock=clock)
    for n in range(50):
        throttle.failure(f"192.0.2.{n}")
    clock.advance(61)
    assert throttle.refused_for("192.0.2.200") == 0.0
    assert len(throttle) == 0


def test_forget(clock):
    throttle = AuthThrottle(limit=1, clock=clock)
    throttle.failure("192.0.2.1")
    assert throttle.refused_for("192.0.2.1") > 0
    throttle.forget("192.0.2.1")
    assert throttle.refused_for("192.0.2.1") == 0.0


def test_from_config_uses_main_cf_parameters(clock):
    cfg = types.SimpleNamespace(auth_failure_limit=3, auth_failure_penalty_time=120)
    throttle = AuthThrottle.from_config(cfg, clock=clock)
    assert (throttle.limit, throttle.penalty_time, throttle.window) == (3, 120.0, 120.0)


@pytest.mark.parametrize("kwargs", [
    {"limit": 0}, {"penalty_time": -1}, {"base_delay": 2, "max_delay": 1}, {"ipv6_prefix": 129},
    {"max_clients": 0},
])
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        AuthThrottle(**kwargs)


def test_default_clock_is_monotonic():
    throttle = AuthThrottle(limit=2, penalty_time=5)
    throttle.failure("192.0.2.1")
    assert throttle.failure("192.0.2.1").refused_for == 5.0
    assert 0 < throttle.refused_for("192.0.2.1") <= 5.0

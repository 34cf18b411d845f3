"""The default thread policy: the cores other processes leave free, never fewer than one."""

from __future__ import annotations

import numba
import pytest

from engine import thread_policy
from engine.thread_policy import ThreadPolicy


class FakeClock:
    """Machine and process CPU counters the test advances by hand."""

    def __init__(self, monkeypatch) -> None:
        self.wall = self.busy = self.own = 0.0
        monkeypatch.setattr(thread_policy.time, "monotonic", lambda: self.wall)
        monkeypatch.setattr(thread_policy, "_allowed_cpus", lambda: list(range(8)))

    def advance(self, seconds: float, others_cores: float, own_cores: float) -> None:
        self.wall += seconds
        self.busy += seconds * (others_cores + own_cores)
        self.own += seconds * own_cores


@pytest.fixture
def clock(monkeypatch):
    clock = FakeClock(monkeypatch)
    monkeypatch.setattr(ThreadPolicy, "_sample", lambda self: (clock.wall, clock.busy, clock.own))
    return clock


@pytest.mark.parametrize(
    ("others", "want"), [(0.0, 8), (0.4, 8), (1.0, 7), (3.3, 5), (7.6, 1), (20.0, 1)]
)
def test_default_uses_the_cores_others_leave_free(clock, others, want):
    policy = ThreadPolicy(cores=8)
    assert policy.threads() == 8  # nothing measured yet
    clock.advance(thread_policy.INTERVAL_S, others, own_cores=4.0)  # ours never counts
    assert policy.threads() == want


def test_it_follows_the_load_but_not_faster_than_its_interval(clock):
    policy = ThreadPolicy(cores=8)
    clock.advance(thread_policy.INTERVAL_S, 6.0, 2.0)
    assert policy.threads() == 2
    clock.advance(thread_policy.INTERVAL_S / 2, 0.0, 2.0)
    assert policy.threads() == 2  # too soon to look again
    clock.advance(thread_policy.INTERVAL_S, 0.0, 2.0)
    assert policy.threads() == 8


def test_a_pause_is_not_judged(clock):
    """A window spanning a pause (others busy while the engine was idle) is dropped: the
    count measured while working stays until a window of work says otherwise."""
    policy = ThreadPolicy(cores=8)
    clock.advance(thread_policy.INTERVAL_S, 0.0, 8.0)
    assert policy.threads() == 8
    clock.advance(thread_policy.STALE_S * 2, 8.0, 0.0)  # the engine idle, others busy
    assert policy.threads() == 8
    clock.advance(thread_policy.INTERVAL_S, 6.0, 2.0)
    assert policy.threads() == 2
    clock.advance(thread_policy.STALE_S * 2, 0.0, 0.0)  # idle, and so were the others
    assert policy.threads() == 2  # kept: nothing measured while working says otherwise


def test_a_fixed_count_is_kept_whatever_the_load(clock):
    policy = ThreadPolicy(fixed=3, cores=8)
    clock.advance(thread_policy.INTERVAL_S, 8.0, 0.0)
    assert policy.threads() == 3


def test_apply_sets_numbas_count_for_the_calling_thread():
    previous = numba.get_num_threads()
    try:
        assert ThreadPolicy(fixed=1).apply() == 1 and numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(previous)

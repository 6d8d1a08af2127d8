"""The guest's per-second counts (nodes/guest/timeline.py): each event lands in the interval of
its time, long runs are folded into coarser intervals within the bound, and the guest core counts
every completed and failed op and every retired workload there."""
from __future__ import annotations

import numpy as np
import pytest

from nodes.guest.core import GuestCore, LoadSpec
from nodes.guest.timeline import MAX_BINS, Timeline
from nodes.wire.codec import Envelope

S = 1_000_000_000


def test_events_land_in_the_interval_of_their_time():
    t = Timeline(10 * S, [("ops", "a", "completed"), ("ops", "a", "failed")])
    t.count(("ops", "a", "completed"), 10 * S)              # the first instant: interval 0
    t.count(("ops", "a", "completed"), 11 * S - 1, 2)       # still interval 0
    t.count(("ops", "a", "completed"), 13 * S + 5, 4)       # interval 3
    t.count(("ops", "a", "failed"), 12 * S)
    d = t.to_dict()
    assert d["interval_s"] == 1.0 and d["t0_ns"] == 10 * S and d["bins"] == 4
    assert d["ops"]["a"] == {"completed": [3, 0, 0, 4], "failed": [0, 0, 1, 0]}


def test_declared_series_are_zeros_and_the_report_time_pads_every_series():
    t = Timeline(0, [("workloads", "completed"), ("workloads", "failed")])
    t.count(("workloads", "completed"), S // 2)
    d = t.to_dict(now=5 * S + 1)
    assert d["bins"] == 6
    assert d["workloads"] == {"completed": [1, 0, 0, 0, 0, 0], "failed": [0] * 6}
    assert Timeline(0, [("x", "y")]).to_dict()["x"] == {"y": []}


def test_an_event_stamped_before_the_start_counts_in_the_first_interval():
    t = Timeline(5 * S)
    t.count(("ops", "a", "completed"), 5 * S - 10)
    assert t.to_dict()["ops"]["a"]["completed"] == [1]


def test_a_long_run_is_folded_into_coarser_intervals_within_the_bound():
    t = Timeline(0, [("ops", "a", "completed")], max_bins=8)
    for sec in range(8):
        t.count(("ops", "a", "completed"), sec * S, sec + 1)     # 1, 2, ... 8
    assert t.to_dict()["ops"]["a"]["completed"] == [1, 2, 3, 4, 5, 6, 7, 8]
    t.count(("ops", "a", "completed"), 8 * S, 100)              # the 9th second: pairs fold
    d = t.to_dict()
    assert d["interval_s"] == 2.0 and d["bins"] == 5
    assert d["ops"]["a"]["completed"] == [3, 7, 11, 15, 100]
    t.count(("ops", "a", "completed"), 40 * S)                  # far past: folds until it fits
    d = t.to_dict()
    assert d["interval_s"] == 8.0 and d["bins"] == 6
    assert sum(d["ops"]["a"]["completed"]) == 36 + 100 + 1
    assert d["ops"]["a"]["completed"][-1] == 1


def test_hours_of_events_stay_within_max_bins():
    t = Timeline(0, [("ops", "a", "completed")])
    for sec in range(0, 10 * 3600, 7):
        t.count(("ops", "a", "completed"), sec * S)
    d = t.to_dict(now=10 * 3600 * S)
    assert d["bins"] <= MAX_BINS and len(d["ops"]["a"]["completed"]) == d["bins"]
    assert d["interval_s"] == 32.0          # 36 000 s / 2048 bins, rounded up to a power of 2
    assert sum(d["ops"]["a"]["completed"]) == len(range(0, 10 * 3600, 7))


def test_a_timeline_refuses_a_bad_interval():
    with pytest.raises(ValueError, match="interval > 0"):
        Timeline(0, interval_ns=0)


def _done(g: GuestCore, first: int, last: int, status: str, now: int) -> None:
    p = {"first": first, "last": last, "n": last - first + 1, "status": status, "n_errors": 0,
         "errors": ()}
    if status == "failed":
        p["reason"] = "EINVAL: refused"
    g.handle(Envelope("WRITE_DONE", 1, 0, 1, 0, 0, p), now)


def test_the_guest_counts_completed_and_failed_ops_per_second_of_its_load():
    g = GuestCore(1, 1024, 1, LoadSpec(mode="closed", concurrency=6, ops=6,
                                       mix={"mmio-write": 1.0}), launcher=None)
    g.map = np.zeros(8, dtype=np.uint64)
    g.ranges = [(0, 4), (4, 4)]
    g.start(100 * S)
    g.tick(100 * S)
    _done(g, 1, 2, "ok", 100 * S + 5)
    _done(g, 3, 4, "unknown", 101 * S)
    _done(g, 5, 6, "failed", 102 * S + 3)
    r = g.report(103 * S)
    tl = r["timeline"]
    assert tl["t0_ns"] == 100 * S and tl["bins"] == 4
    # only the mixes of the load, and no workloads without the submit mix
    assert set(tl) == {"interval_s", "t0_ns", "bins", "ops"}
    # unknown outcomes have their own series: a fault's window is charged with them
    assert tl["ops"] == {"mmio-write": {"completed": [2, 0, 0, 0], "failed": [0, 0, 2, 0],
                                        "unknown": [0, 2, 0, 0]}}
    assert sum(tl["ops"]["mmio-write"]["completed"]) == r["completed"]
    assert sum(tl["ops"]["mmio-write"]["failed"]) == r["failed"]

"""The guest i915 model: its boot on GVT-g (PV page, version, balloon, CSB reset, execlists),
what it makes of WRITE_DONE outcomes, and the register check for reads after writes whose
outcome is unknown. The hypervisor, mediator and gpu behind it are the real cores."""
from __future__ import annotations

import numpy as np
import pytest

from harness import add_guest, make_bench
from nodes.errors import GvtError
from nodes.guest.core import GuestCore, LoadSpec, _register_values
from nodes.hw import gtt, pvinfo, regs
from nodes.wire.codec import Envelope


@pytest.fixture
def bench():
    b = make_bench()
    b.setup([(1, "_8"), (2, "_8")])
    yield b
    b.close()


def boot(b, vm: int = 1, **kw) -> tuple[GuestCore, dict]:
    g = add_guest(b.net, vm, 16384, **kw)
    box = b.net.spawn(f"guest{vm}", g.boot_and_start(False, None))
    b.net.run(until=lambda: bool(box))
    return g, box


def test_boot_reads_the_pv_page_balloons_and_enables_execlists(bench):
    g, box = boot(bench)
    assert "error" not in box and g.state == "booted"
    part = bench.mediator.vgpus[1].part
    assert g.pv["vgt_id"] == 1 and g.pv["version"] == 1 and g.pv["fences"] == 4
    assert g.pv["caps"] & pvinfo.CAPS_FULL_PPGTT
    # ballooned to exactly its ranges
    assert g.ranges == [(gtt.index_of_gm(part.aperture_base), gtt.index_of_gm(part.aperture_size)),
                        (gtt.index_of_gm(part.hidden_base), gtt.index_of_gm(part.hidden_size))]
    v = bench.mediator.vgpus[1]
    assert v.pv_notified and v.failsafe is None
    assert v.vregs[regs.ring("rcs", regs.RING_MODE)] & regs.GFX_MODE_RUN_LIST_ENABLE
    assert v.vregs[regs.ring("rcs", regs.RING_CSB_PTR)] == 0x505   # i915's CSB reset, read back


def test_boot_refuses_a_page_without_the_magic(bench):
    bench.mediator.vgpus[1].vregs[pvinfo.BASE + 4] = 0
    g, box = boot(bench)
    assert box["error"].code == "ENODEV" and "vGTvGTvG" in box["error"].text
    assert g.state == "failed" and g.boot_error


def test_a_failed_boot_tells_the_launcher_at_once(bench):
    """Else the launcher learns of it only when it gives up waiting for the load to end (a
    guest reports progress while its load runs)."""
    bench.mediator.vgpus[1].vregs[pvinfo.BASE + 4] = 0
    g = add_guest(bench.net, 1, 16384)
    g.launcher = "launcher"
    box = bench.net.spawn("guest1", g.boot_and_start(True, None))
    bench.net.run(until=lambda: bool(box) and bench.net.sent("PROGRESS", src="guest1"))
    [told] = bench.net.sent("PROGRESS", src="guest1")
    assert told.payload["report"]["state"] == "failed" and told.vgpu == 1


def test_boot_refuses_another_major_version(bench):
    bench.mediator.vgpus[1].vregs[pvinfo.BASE + pvinfo.VERSION_MAJOR_OFF] = 2
    g, box = boot(bench)
    assert box["error"].code == "EPROTO" and "2.0" in box["error"].text


def test_a_guest_that_skips_the_pv_page_ends_in_failsafe(bench):
    g, box = boot(bench, gvt_aware=False)
    assert bench.mediator.vgpus[1].failsafe == "unsupported_guest"
    assert bench.mediator.vgpus[2].failsafe is None


def test_boot_retries_until_the_vgpu_exists():
    b = make_bench()
    try:
        g = add_guest(b.net, 1, 16384)
        box = b.net.spawn("guest1", g.boot_and_start(False, None))
        b.net.run(until=lambda: len(b.net.sent("MMIO_READ")) >= 3, advance=True)
        assert not box                          # still waiting: the mediator answers ENODEV
        b.setup([(1, "_8")])
        b.net.run(until=lambda: bool(box))
        assert g.state == "booted"
    finally:
        b.close()


def test_a_load_runs_to_completion_with_every_read_consistent(bench):
    spec = LoadSpec(mode="closed", concurrency=16, ops=600, burst=32,
                    mix={"mmio-read": 0.45, "mmio-write": 0.45, "gtt-burst": 0.1})
    g, box = boot(bench, load=spec)
    g.start(bench.net.now)
    bench.net.run(until=lambda: g.state == "drained")
    r = g.report(bench.net.now)
    assert r["issued"] == r["completed"] == 600 and r["failed"] == r["unknown"] == 0
    assert r["mismatches"] == 0 and r["pending"] == 0
    assert r["latency"]["mmio_read"]["count"] > 0


def _write_done(g: GuestCore, first: int, last: int, status: str, now: int = 5) -> None:
    p = {"first": first, "last": last, "n": last - first + 1, "status": status, "n_errors": 0,
         "errors": ()}
    if status != "ok":
        p["reason"] = "ETIMEDOUT: mediator did not answer TRAP_WRITE within 10 s"
    g.handle(Envelope("WRITE_DONE", 1, 0, 1, 0, 0, p), now)


def _loaded_guest(spec: LoadSpec) -> GuestCore:
    g = GuestCore(1, 1024, 1, spec, launcher=None)
    g.map = np.zeros(8, dtype=np.uint64)
    g.ranges = [(0, 4), (4, 4)]
    g.start(0)
    return g


def test_write_outcomes_are_counted_as_ok_failed_or_unknown():
    g = _loaded_guest(LoadSpec(mode="closed", concurrency=6, ops=6, mix={"mmio-write": 1.0}))
    g.tick(1)
    assert len(g.writes) == 6
    _write_done(g, 1, 2, "ok")
    _write_done(g, 3, 4, "unknown")
    _write_done(g, 5, 6, "failed")
    r = g.report(10)
    assert (r["completed"], r["unknown"], r["failed"], r["pending"]) == (2, 2, 2, 0)
    assert r["issued"] == r["completed"] + r["unknown"] + r["failed"]


def test_a_refused_write_answered_out_of_order_settles_only_itself():
    g = _loaded_guest(LoadSpec(mode="closed", concurrency=3, ops=3, mix={"mmio-write": 1.0}))
    g.tick(1)
    _write_done(g, 3, 3, "failed")          # the hypervisor refused the last one at once
    assert sorted(g.writes) == [1, 2]
    _write_done(g, 1, 2, "ok")
    assert not g.writes and g.completed == 2 and g.failed == 1


def test_register_check_accepts_either_value_after_a_write_of_unknown_outcome():
    # oldest first: [w, value, outcome, gpr]
    assert _register_values(7, []) == {7}
    assert _register_values(7, [[1, 8, "ok", 0]]) == {8}
    assert _register_values(7, [[1, 8, "unknown", 0]]) == {7, 8}
    assert _register_values(7, [[1, 8, "failed", 0]]) == {7}
    assert _register_values(7, [[1, 8, "ok", 0], [2, 9, "unknown", 0], [3, 10, "failed", 0]]) == {8, 9}
    assert _register_values(7, [[1, 8, "unknown", 0], [2, 9, "ok", 0]]) == {9}
    assert _register_values(7, [[1, 8, None, 0]]) == {7, 8}      # not known yet: both


@pytest.mark.parametrize("lost", ["request", "answer"])
def test_a_read_after_an_unknown_write_is_not_a_mismatch(bench, lost):
    """End to end: a write whose outcome is unknown (its TRAP_WRITE or its answer lost). A later
    read returns the old value (never applied) or the new one (applied, answer lost): neither
    is a stale read."""
    spec = LoadSpec(mode="closed", concurrency=1, ops=1, mix={"mmio-write": 1.0})
    g, _ = boot(bench, load=spec)
    g.start(bench.net.now)
    if lost == "request":
        bench.net.lose = lambda s, d, e: e.kind == "TRAP_WRITE"
    else:
        bench.net.lose = lambda s, d, e: s == "mediator" and d == "hypervisor" and e.kind == "REPLY"
    bench.net.run(until=lambda: g.state == "drained")
    bench.net.lose = None
    assert g.unknown == 1
    (k, entry), = [(k, h[-1]) for k, h in enumerate(g.gpr_hist) if h]
    applied = bench.mediator.vgpus[1].vregs.get(regs.RCS_GPR0 + 4 * k, 0) == entry[1]
    assert applied == (lost == "answer")
    call_box = bench.net.spawn("guest1", g._op_read(bench.net.now, k, g.gpr_base[k], [entry]))
    g.reads_inflight += 1
    bench.net.run(until=lambda: bool(call_box))
    assert g.mismatches == 0 and not g.fail_reasons


def test_probe_boots_the_guest_then_times_reads_one_after_another(bench):
    g = add_guest(bench.net, 1, 16384)
    box = bench.net.spawn("guest1", g.probe(8, bench.net.now))
    bench.net.run(until=lambda: bool(box))
    assert "error" not in box and g.state == "booted"
    got = box["value"]
    assert got["reads"] == 8 and 0 <= got["min_us"] <= got["p50_us"] <= got["max_us"]
    # the boot read the version register once, the probe 8 times more: real trapped reads
    off = pvinfo.BASE + pvinfo.VERSION_MAJOR_OFF
    reads = [e for _s, _d, e in bench.net.log if e.kind == "MMIO_READ" and e.payload["off"] == off]
    assert len(reads) == 9
    # a booted guest is not booted again
    box = bench.net.spawn("guest1", g.probe(2, bench.net.now))
    bench.net.run(until=lambda: bool(box))
    assert box["value"]["reads"] == 2 and g.state == "booted"
    assert len([e for _s, _d, e in bench.net.log if e.kind == "MMIO_READ"
                and e.payload["off"] == off]) == 11
    for bad in (0, 257):
        with pytest.raises(GvtError) as e:
            next(g.probe(bad, bench.net.now))
        assert e.value.code == "EINVAL" and "1..256" in e.value.text


def test_start_spec_replaces_the_load_and_refuses_unknown_keys(bench):
    g, _ = boot(bench)
    g.start(0, {"mode": "closed", "concurrency": 2})
    assert g.load.mode == "closed" and g.load.concurrency == 2
    with pytest.raises(GvtError) as e:
        g.start(0, {"mood": "open"})
    assert e.value.code == "EINVAL" and "mood" in e.value.text

"""`gvtbench run --trace`: the guest's sampling, each node's bound on spans, the trace file built
from spans, and real runs whose file is checked against the trace-event format (tests/tracecheck.py)
as Perfetto and chrome://tracing read it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

import tracecheck
from bench import config, trace
from bench.launch import Launcher, RunFailed
from harness import make_bench
from nodes.core import Core
from nodes.actions import Call, Post
from nodes.guest.core import GuestCore, LoadSpec
from nodes.wire.codec import Envelope

MS = 1_000_000


# ---- the checker itself: it must refuse what the viewers refuse --------------------------------
def _x(name, ts, dur, tid=1, pid=1):
    return {"name": name, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def _flow(ph, fid, ts, tid=1, pid=1, **kw):
    return {"name": "m", "cat": "flow", "ph": ph, "id": fid, "ts": ts, "pid": pid, "tid": tid, **kw}


@pytest.mark.parametrize("events,words", [
    ([{"name": "a", "ph": "X", "ts": 1, "pid": 1, "tid": 1}], "no dur"),
    ([{"name": "a", "ph": "B", "pid": 1, "tid": 1}], "no ts"),
    ([{"ph": "X", "ts": 1, "dur": 1, "pid": 1, "tid": 1}], "lacks ph or name"),
    ([{"name": "a", "ph": "X", "ts": 1, "dur": 1, "pid": 1}], "integer pid and tid"),
    ([_x("a", 5, 1), _x("b", 3, 1)], "ts goes back"),
    ([{"name": "a", "ph": "B", "ts": 1, "pid": 1, "tid": 1}], "never closed"),
    ([{"name": "a", "ph": "E", "ts": 1, "pid": 1, "tid": 1}], "no open B"),
    ([{"name": "a", "ph": "B", "ts": 1, "pid": 1, "tid": 1},
      {"name": "b", "ph": "E", "ts": 2, "pid": 1, "tid": 1}], "closes B"),
    ([_x("a", 1, 10), _x("b", 5, 10)], "ends after it"),
    ([_x("a", 1, 10), {"name": "m", "cat": "flow", "ph": "s", "ts": 2, "pid": 1, "tid": 1}], "lacks an id"),
    ([_x("a", 1, 10), _flow("s", "1", 2)], "0 ends"),
    ([_x("a", 1, 10), _x("b", 20, 5, tid=2), _flow("s", "1", 2), _flow("f", "1", 30, tid=2)],
     "inside no slice"),
    ([_x("a", 1, 10), _x("b", 20, 5, tid=2), _flow("f", "1", 2, bp="e"), _flow("s", "1", 22, tid=2)],
     "not in time order"),
    ([{"name": "nope", "ph": "M", "pid": 1, "tid": 0, "args": {}}], "not one viewers know"),
])
def test_the_checker_refuses_what_viewers_refuse(events, words):
    errs, _ = tracecheck.check({"traceEvents": events, "displayTimeUnit": "ns"})
    assert any(words in e for e in errs), errs


def test_the_checker_accepts_nesting_and_joins_slices_by_flows():
    events = [_x("a", 1, 10), _x("a.1", 2, 3), _x("a.2", 5, 6),      # nested, touching
              {"name": "b", "ph": "B", "ts": 20, "pid": 2, "tid": 1},
              {"name": "b", "ph": "E", "ts": 30, "pid": 2, "tid": 1},
              _x("c", 40, 5, pid=3),
              _flow("s", "1", 3), _flow("f", "1", 25, pid=2, bp="e"),
              _flow("s", 7, 26, pid=2), _flow("t", 7, 27, pid=2), _flow("f", 7, 42, pid=3, bp="e")]
    events.sort(key=lambda e: (e["pid"], e["tid"], e["ts"]))
    errs, comps = tracecheck.check({"traceEvents": events, "displayTimeUnit": "ms"})
    assert errs == []
    joined = max(comps, key=len)
    assert {p for p, _, _ in joined} == {1, 2, 3}     # a.1 -> b -> c
    assert len(comps) == 3                             # a and a.2 stand alone


# ---- the file built from spans --------------------------------------------------------------------
def test_spans_become_tracks_that_nest_and_flows_that_join_both_ends_of_each_message():
    t = (1 << 40) | 1
    guest = trace.NodeSpans("guest1", 11, [
        [1000, 50_000, 1, "MMIO_READ", t, "call", [["hypervisor", 4, 49_000, "REPLY"]],
         [["hypervisor", 7, 1_100, "MMIO_READ"]]],
        [2000, 60_000, 1, "MMIO_WRITE", t + 1, "post", [], [["hypervisor", 8, 2_100, "MMIO_WRITE"]]],
    ])
    hv = trace.NodeSpans("hypervisor", 12, [
        [3000, 48_000, 1, "MMIO_READ", t, "handle", [["guest1", 7, 3000, "MMIO_READ"]],
         [["guest1", 4, 47_000, "REPLY"]]],
        [5000, 6000, 1, "MMIO_WRITE", t + 1, "handle", [["guest1", 8, 5000, "MMIO_WRITE"]], []],
        [9000, 20_000, 1, "forward", t + 1, "task", [], [["mediator", 3, 9500, "TRAP_WRITE"]]],
        # the other end of this one was never recorded (its node died): no flow
        [30_000, 31_000, 2, "IRQ", t + 2, "handle", [["mediator", 99, 30_000, "INJECT_MSI"]], []],
    ])
    doc = trace.build([hv, guest], {"run_id": "x"})
    errs, comps = tracecheck.check(doc)
    assert errs == []
    names = tracecheck.process_names(doc)
    assert [names[p] for p in sorted(names)] == ["guest1", "hypervisor"]     # guests first
    threads = {(e["pid"], e["args"]["name"]) for e in doc["traceEvents"] if e["name"] == "thread_name"}
    # guest1's two spans overlap: two tracks of vGPU 1; the hypervisor's MMIO_WRITE and forward
    # lie inside its MMIO_READ: a second track; vGPU 2 has its own
    assert threads == {(1, "vGPU 1"), (1, "vGPU 1 #2"), (2, "vGPU 1"), (2, "vGPU 1 #2"), (2, "vGPU 2")}
    xs = {e["name"]: e for e in doc["traceEvents"] if e["ph"] == "X"}
    assert xs["call MMIO_READ"]["ts"] == 0 and xs["call MMIO_READ"]["dur"] == 49.0   # us from the first
    assert xs["send MMIO_WRITE"]["args"]["trace"] == hex(t + 1)
    # flows: read there and back, the write's message, and its forward from its arrival
    assert doc["metadata"]["flows"] == 4
    flows = [e for e in doc["traceEvents"] if e["ph"] in "sf"]
    assert sorted(e["name"] for e in flows if e["ph"] == "s") == ["MMIO_READ", "MMIO_WRITE", "REPLY",
                                                                 "internal"]
    assert all(e["bp"] == "e" for e in flows if e["ph"] == "f")
    # the read's two spans are one piece, the write's three another; the IRQ stands alone
    assert sorted(len(c) for c in comps) == [1, 2, 3]


# ---- the guest's sampling ------------------------------------------------------------------------
def _loaded(spec: LoadSpec, vm: int = 3) -> GuestCore:
    g = GuestCore(vm, 1024, 1, spec, launcher=None)
    g.map = np.zeros(8, dtype=np.uint64)
    g.ranges = [(0, 4), (4, 4)]
    g.start(0)
    return g


def _traces_of(g: GuestCore, until_ns: int, step_ns: int) -> list[int]:
    """Tick the guest's open-loop load and settle every write at once; the trace ids its
    messages carry, in order."""
    out = []
    for now in range(0, until_ns + 1, step_ns):
        g.tick(now)
        for a in g.take_actions():
            assert isinstance(a, Post)
            out += [a.trace] if a.trace else []
        if g.writes:
            first, last = min(g.writes), max(g.writes)
            g.handle(Envelope("WRITE_DONE", 1, 0, g.vm, 0, 0,
                              {"first": first, "last": last, "n": last - first + 1, "status": "ok",
                               "n_errors": 0, "errors": []}), now)
    return out


def test_the_guest_samples_trace_rate_operations_per_second_by_their_intended_time():
    g = _loaded(LoadSpec(mode="open", rate=1000, duration_s=2, mix={"mmio-write": 0.7, "gtt-burst": 0.3},
                         burst=8, trace_rate=50))
    got = _traces_of(g, 2100 * MS, MS)
    assert len(got) == 100 == g.traced == g.report(0)["traced"]     # 50/s for 2 s, not 2000
    assert len(set(got)) == 100 and all(t >> 40 == 3 and t & ((1 << 40) - 1) for t in got)
    assert g.issued == 2000


def test_when_operations_are_sparser_than_the_rate_each_is_sampled_and_none_without_a_rate():
    sparse = _loaded(LoadSpec(mode="open", rate=10, duration_s=2, mix={"mmio-write": 1.0}, trace_rate=50))
    assert len(_traces_of(sparse, 2100 * MS, MS)) == sparse.issued == 20
    off = _loaded(LoadSpec(mode="open", rate=1000, duration_s=1, mix={"mmio-write": 1.0}))
    assert _traces_of(off, 1100 * MS, MS) == [] and off.issued == 1000


def test_a_sampled_read_carries_its_id_on_its_call():
    g = _loaded(LoadSpec(mode="closed", concurrency=1, ops=1, mix={"mmio-read": 1.0}, trace_rate=5))
    g.tick(0)
    task = g.take_actions()[0]
    call = next(task)
    assert isinstance(call, Call) and call.kind == "MMIO_READ" and call.trace == (3 << 40) | 1


# ---- a node's bound on spans (sans-IO: real engines, virtual time) ----------------------------------
def test_a_node_keeps_at_most_its_bound_of_spans_and_counts_the_rest():
    b = make_bench(trace_spans=10)
    try:
        b.setup([(1, "_8"), (2, "_8")])

        def reads():
            for k in range(30):
                yield Call("mediator", "TRAP_READ", {"off": 0x2600, "size": 4}, vgpu=1,
                           trace=(1 << 40) | (k + 1))
        box = b.net.spawn("hypervisor", reads())
        b.net.run(until=lambda: bool(box))
        assert "error" not in box
        med, hv = b.net.engines["mediator"], b.net.engines["hypervisor"]
        for eng in (med, hv):
            assert len(eng.spans) == 10 and eng.spans_dropped == 20
            assert eng.stats.get("gvtbench_trace_spans", ("kept",)) == 10
            assert eng.stats.get("gvtbench_trace_spans", ("dropped",)) == 20
            page = eng.trace_page(0)
            assert len(page["spans"]) == page["total"] == 10 and page["dropped"] == 20
        # the first ten of each: the mediator handled what the hypervisor called, message by message
        assert [s[4] & 0xFF for s in med.spans] == list(range(1, 11))
        for call_span, handled in zip(hv.spans, med.spans):
            assert call_span[5] == "call" and handled[5] == "handle" and handled[3] == "TRAP_READ"
            to, seq, _t, kind = call_span[7][0]
            assert (to, kind) == ("mediator", "TRAP_READ") and handled[6][0][:2] == ("hypervisor", seq)
            assert handled[7][0][3] == "REPLY" and call_span[6][0][3] == "REPLY"
        # nothing was traced before: setup's messages carry no id
        assert all(s[4] >> 40 == 1 for s in med.spans)
    finally:
        b.close()


# ---- real runs -----------------------------------------------------------------------------------
RUN_TOML = """
[run]
duration_s = 2
seed = 5
[vgpus]
count = 2
ram_mib = 16
[load]
mode = "open"
rate = 150
burst = 32
mix = { "mmio-read" = 0.25, "mmio-write" = 0.2, "gtt-burst" = 0.1, "submit" = 0.3, "ppgtt-churn" = 0.15 }
"""


def _spans_by(doc: dict) -> dict[str, set[str]]:
    names = tracecheck.process_names(doc)
    out: dict[str, set[str]] = defaultdict(set)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            out[names[e["pid"]]].add(e["name"])
    return out


def _operations(doc: dict, comps: list, whole: bool = True) -> dict[str, set[str]]:
    """Each sampled operation's processes, from the slices flows join; also checks that flows
    never join two operations and (whole) join all of one: when nothing was in flight as the
    spans were collected."""
    names = tracecheck.process_names(doc)
    per_track: dict[tuple[int, int], list[dict]] = defaultdict(list)
    for e in doc["traceEvents"]:
        if e["ph"] == "X":
            per_track[(e["pid"], e["tid"])].append(e)
    for evs in per_track.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))       # as the checker numbers them
    ops: dict[str, set[str]] = {}
    for comp in comps:
        traces = {per_track[(p, t)][k]["args"]["trace"] for p, t, k in comp}
        assert len(traces) == 1, f"flows join operations {sorted(traces)[:4]}"
        (tr,) = traces
        assert not whole or tr not in ops, f"operation {tr} falls apart into pieces no flow joins"
        ops[tr] = ops.get(tr, set()) | {names[p] for p, _t, _k in comp}
    return ops


def test_a_traced_run_writes_a_timeline_of_traps_and_workloads_across_the_processes(tmp_path):
    cfgf, out, res_path = tmp_path / "c.toml", tmp_path / "t.json", tmp_path / "r.json"
    cfgf.write_text(RUN_TOML)
    p = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(cfgf), "--trace", str(out),
                        "--trace-rate", "40", "--json", str(res_path)],
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "ui.perfetto.dev" in p.stderr and str(out) in p.stderr
    doc = json.loads(out.read_text())
    errs, comps = tracecheck.check(doc)
    assert errs == [], errs[:10]
    assert doc["displayTimeUnit"] == "ns" and doc["metadata"]["trace_rate"] == 40
    assert doc["metadata"]["missing"] == []
    assert set(tracecheck.process_names(doc).values()) == {"guest1", "guest2", "hypervisor/0",
                                                           "mediator/0", "gpu/0"}
    by = _spans_by(doc)
    # traps: the guest's read and its emulation; workloads: ELSP, dispatch, execution, interrupts
    assert {"call MMIO_READ", "WRITE_DONE", "IRQ"} <= by["guest1"] | by["guest2"]
    assert {"MMIO_READ", "forward", "INJECT_MSI", "PAGE_FAULT"} <= by["hypervisor/0"]
    assert {"TRAP_READ", "TRAP_WRITE", "ENGINE_IRQ", "TRACKED_WRITE"} <= by["mediator/0"]
    assert {"MMIO_WRITE_BATCH"} <= by["gpu/0"] and any(n.startswith("execute ") for n in by["gpu/0"])
    ops = _operations(doc, comps)
    assert max(len(v) for v in ops.values()) >= 4          # guest, hypervisor, mediator, gpu
    res = json.loads(res_path.read_text())
    assert res["verdict"] == "pass", res["reasons"]
    assert res["trace"]["spans"] == sum(1 for e in doc["traceEvents"] if e["ph"] == "X")
    assert res["trace"]["operations"] == len(ops) and res["trace"]["dropped"] == 0
    for v in res["vgpus"]:
        traced = v["guest"]["traced"]
        assert 20 <= traced <= 40 * 2 + 1                  # at most the rate, by intended time
        mine = [t for t in ops if int(t, 16) >> 40 == v["id"]]
        assert 0 < len(mine) <= traced                      # a store that did not fault sends nothing


def test_a_node_killed_mid_run_contributes_nothing_and_the_trace_is_still_valid(tmp_path):
    cfg = config.validate({"run": {"duration_s": 30, "seed": 3, "trace_rate": 100},
                           "vgpus": {"count": 2, "ram_mib": 16},
                           "load": {"rate": 300, "burst": 32}}, "test")
    out = tmp_path / "t.json"
    launcher = None

    def kill_guest2(view: dict) -> None:
        g1 = view["guests"].get(1, {})
        p = launcher.procs.get("guest2")
        if view["phase"] == "load" and g1.get("issued", 0) > 200 and p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
    launcher = Launcher(cfg, on_progress=kill_guest2, trace_path=str(out))
    with pytest.raises(RunFailed, match="guest2"):
        launcher.run()
    doc = json.loads(out.read_text())
    errs, comps = tracecheck.check(doc)
    assert errs == [], errs[:10]
    assert doc["metadata"]["missing"] == ["guest2"]
    assert set(tracecheck.process_names(doc).values()) == {"guest1", "hypervisor/0", "mediator/0", "gpu/0"}
    # guest1 was still running when its spans were collected: what was in flight is in pieces
    ops = _operations(doc, comps, whole=False)
    assert max(len(v) for v in ops.values()) >= 3
    assert launcher.trace_summary is not None and launcher.trace_summary["path"] == str(out)


def test_a_guest_can_trace_only_its_own_vms_operations():
    """Trace ids are vm << 40 | n: the hypervisor records and carries on guest 1's own ids, and
    treats a message naming VM 2's operation as untraced."""
    b = make_bench(trace_spans=100)
    try:
        b.setup([(1, "_8"), (2, "_8")])
        b.net.add("guest1", _Quiet(), trace_spans=100)
        b.net.connect("guest1", "hypervisor")

        def writes():
            for trace in ((2 << 40) | 1, (1 << 40) | 7):
                yield Post("hypervisor", "MMIO_WRITE", {"off": 0x2600, "size": 4, "val": 5, "w": 1},
                           vgpu=1, trace=trace)
        box = b.net.spawn("guest1", writes())
        b.net.run()
        assert box == {"value": None}
        hv = b.net.engines["hypervisor"]
        assert {s[4] for s in hv.spans} == {(1 << 40) | 7}
        assert {e.trace for e in b.net.sent("TRAP_WRITE")} <= {0, (1 << 40) | 7}
    finally:
        b.close()


class _Quiet(Core):
    """A guest stand-in that takes what the hypervisor sends it and does nothing."""
    def handle(self, msg: Envelope, now: int) -> None:
        return None

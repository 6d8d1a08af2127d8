"""Workloads, sans-IO: the ELSP sequence and execlist/CSB emulation, interrupt propagation, each
PPGTT shadow rule, and the gpu executing what the guest i915 builds, with real cores on the
in-memory network (tests/harness.py)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from harness import SEED, add_guest, enable_execlists, make_bench, run_task, started_bench
from nodes.guest.core import LoadSpec
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, lrc, regs
from nodes.mediator import execlist, interrupt
from nodes.mediator.translate import get_translator
from nodes.wire.codec import decode

A = lrc.descriptor(0x10000, 0xA)
B = lrc.descriptor(0x20000, 0xB)
NONE = lrc.Descriptor(0, 0)


@pytest.fixture(params=["c", "python"])
def bench(request):
    yield from started_bench(translate=get_translator(request.param))


run = run_task


def csb(v, engine="rcs"):
    """(write pointer, [(status, ctx id)] of the whole buffer) from the vregs."""
    ptr = v.vregs[regs.ring(engine, regs.RING_CSB_PTR)] & 7
    base = regs.ring(engine, regs.RING_CSB)
    return ptr, [(v.vregs.get(base + 8 * i, 0), v.vregs.get(base + 8 * i + 4, 0)) for i in range(6)]


# ---- ELSP and execlists ------------------------------------------------------------------------------
def test_elsp_takes_element1_hi_lo_then_element0_hi_lo_and_the_fourth_submits():
    el = execlist.Execlist("rcs")
    dws = lrc.elsp_dwords(A, B)
    assert dws == [B.hi, B.lo, A.hi, A.lo]
    assert [el.elsp_write(d) for d in dws[:3]] == [None, None, None]
    assert el.elsp_write(dws[3]) == (A, B)
    assert el.index == 0                    # the next write starts a new submission


def test_elsp_before_execlists_are_enabled_is_refused(bench):
    """Until the guest enables execlists (GFX_MODE run list) GVT-g does not schedule the vGPU at
    all (intel_vgpu_start_schedule); the bench refuses the submission outright."""
    elsp = regs.ring("rcs", regs.RING_ELSP)
    res = bench.trap_writes(1, [(elsp, 4, d) for d in lrc.elsp_dwords(A)])
    assert res["n_errors"] == 1 and "before the guest enabled execlists" in res["errors"][0]
    assert not bench.mediator.vgpus[1].queues["rcs"] and bench.mediator.vgpus[1].failsafe is None


def test_elsp_refuses_an_invalid_element0_and_a_missing_privilege_bit(bench):
    enable_execlists(bench, 1)
    elsp = regs.ring("rcs", regs.RING_ELSP)
    res = bench.trap_writes(1, [(elsp, 4, d) for d in lrc.elsp_dwords(NONE, A)])
    assert res["n_errors"] == 1 and "element 0 is not valid" in res["errors"][0]
    no_priv = lrc.Descriptor(A.lo & ~lrc.DESC_PRIVILEGE, A.hi)
    res = bench.trap_writes(1, [(elsp, 4, d) for d in lrc.elsp_dwords(no_priv)])
    assert res["n_errors"] == 1 and "privilege" in res["errors"][0]
    assert not bench.mediator.vgpus[1].queues["rcs"]


def test_csb_pointer_wraps_over_six_entries_and_the_status_page_mirrors_it(bench):
    v = bench.mediator.vgpus[1]
    hwsp_gfn = 40
    idx = bench.ap_index(1)
    bench.ggtt_write(1, idx, (hwsp_gfn << PAGE_SHIFT) | 3)
    bench.trap_write(1, regs.ring("rcs", regs.RING_HWS_PGA), 4, idx << PAGE_SHIFT)
    el = v.execlists["rcs"]
    pointers = []
    for k in range(8):
        run(bench, execlist.csb_update(v, el, lrc.CSB_CONTEXT_COMPLETE, 0x100 + k))
        pointers.append(csb(v)[0])
    assert pointers == [0, 1, 2, 3, 4, 5, 0, 1]          # from 7 after reset, then modulo 6
    _, entries = csb(v)
    assert entries[1] == (lrc.CSB_CONTEXT_COMPLETE, 0x107) and entries[2] == (lrc.CSB_CONTEXT_COMPLETE, 0x102)
    page = bench.hv.gpa_read(bench.hv.vms[1], [[hwsp_gfn << PAGE_SHIFT, PAGE_SIZE]])[0]
    dws = struct.unpack("<1024I", page)
    assert dws[lrc.HWS_CSB_WRITE_INDEX] == 1
    assert dws[lrc.HWS_CSB_BUF0_INDEX + 2:lrc.HWS_CSB_BUF0_INDEX + 4] == (lrc.CSB_CONTEXT_COMPLETE, 0x107)


def test_an_hwsp_outside_the_vgpu_is_refused(bench):
    res = bench.trap_write(1, regs.ring("rcs", regs.RING_HWS_PGA), 4, 0x1000)
    assert res["n_errors"] == 1 and "HWSP" in res["errors"][0]
    assert "rcs" not in bench.mediator.vgpus[1].hws_pga


def test_schedule_in_from_idle_then_lite_restore_of_the_running_context(bench):
    v = bench.mediator.vgpus[1]
    el = v.execlists["rcs"]
    run(bench, execlist.schedule_in(v, el, (A, NONE)))
    assert csb(v)[1][0] == (lrc.CSB_IDLE_TO_ACTIVE, 0) and el.running_ctx == A
    status = v.vregs[regs.ring("rcs", regs.RING_EXECLIST_STATUS)]
    assert status & lrc.EL_STATUS_0_ACTIVE and v.vregs[regs.ring("rcs", regs.RING_EXECLIST_STATUS) + 4] == A.hi
    first = el.running
    run(bench, execlist.schedule_in(v, el, (A, NONE)))     # the same context, a new tail
    assert csb(v)[1][1] == (lrc.CSB_LITE_RESTORE | lrc.CSB_PREEMPTED, A.hi)
    assert el.running is not first and el.pending is None
    run(bench, execlist.schedule_out(v, el, A))
    assert csb(v)[1][2] == (lrc.CSB_CONTEXT_COMPLETE | lrc.CSB_ACTIVE_TO_IDLE, A.hi)
    assert el.running is None


def test_a_second_bundle_waits_in_the_pending_slot_and_starts_after_the_first(bench):
    v = bench.mediator.vgpus[1]
    el = v.execlists["rcs"]
    run(bench, execlist.schedule_in(v, el, (A, NONE)))
    run(bench, execlist.schedule_in(v, el, (B, NONE)))      # not a lite restore: pending, no CSB
    assert csb(v)[0] == 0 and el.pending is not None
    assert v.vregs[regs.ring("rcs", regs.RING_EXECLIST_STATUS)] & lrc.EL_STATUS_QUEUE_FULL
    with pytest.raises(Exception):
        run(bench, execlist.schedule_in(v, el, (A, NONE)))  # both slots taken
    run(bench, execlist.schedule_out(v, el, A))
    ptr, entries = csb(v)
    assert ptr == 2
    assert entries[1] == (lrc.CSB_CONTEXT_COMPLETE | lrc.CSB_ACTIVE_TO_IDLE, A.hi)
    assert entries[2] == (lrc.CSB_IDLE_TO_ACTIVE, 0)
    assert el.running_ctx == B and el.pending is None


def test_two_elements_give_an_element_switch_then_active_to_idle(bench):
    v = bench.mediator.vgpus[1]
    el = v.execlists["rcs"]
    run(bench, execlist.schedule_in(v, el, (A, B)))
    run(bench, execlist.schedule_out(v, el, A))
    assert csb(v)[1][1] == (lrc.CSB_CONTEXT_COMPLETE | lrc.CSB_ELEMENT_SWITCH, A.hi)
    assert el.running_ctx == B
    with pytest.raises(Exception):
        run(bench, execlist.schedule_out(v, el, A))          # A is not running any more
    run(bench, execlist.schedule_out(v, el, B))
    assert csb(v)[1][2] == (lrc.CSB_CONTEXT_COMPLETE | lrc.CSB_ACTIVE_TO_IDLE, B.hi)


def test_an_engine_reset_drops_the_execlist_state(bench):
    v = bench.mediator.vgpus[1]
    run(bench, execlist.schedule_in(v, v.execlists["bcs"], (A, NONE)))
    bench.trap_write(1, regs.GDRST, 4, regs.GRDOM_BLT)
    assert v.execlists["bcs"].running is None
    assert v.vregs[regs.ring("bcs", regs.RING_CSB_PTR)] & 0x707 == 0x7


# ---- interrupts -------------------------------------------------------------------------------------
CTX_SWITCH = regs.engine_event("rcs", regs.GT_CONTEXT_SWITCH)[1]


def _irq_setup(b, imr=None, ier=CTX_SWITCH, master=True):
    b.trap_writes(1, [(regs.gt_ier(0), 4, ier), (regs.gt_imr(0), 4, ~CTX_SWITCH & 0xFFFFFFFF if imr is None else imr),
                      (regs.MASTER_IRQ, 4, regs.MASTER_IRQ_CONTROL if master else 0)])


@pytest.mark.parametrize("imr, ier, master, iir_set, msi", [
    (None, CTX_SWITCH, True, True, True),           # unmasked, enabled, master on
    (0xFFFFFFFF, CTX_SWITCH, True, False, False),   # masked in IMR: not even IIR
    (None, 0, True, True, False),                   # IIR set, not enabled in IER: no MSI
    (None, CTX_SWITCH, False, True, False),         # master off: no MSI
])
def test_a_context_switch_event_sends_an_msi_only_unmasked_enabled_and_with_master_on(bench, imr, ier, master,
                                                                                     iir_set, msi):
    _irq_setup(bench, imr, ier, master)
    v = bench.mediator.vgpus[1]
    actions = interrupt.trigger_event(v, "rcs", regs.GT_CONTEXT_SWITCH)
    assert bool(v.vregs.get(regs.gt_iir(0), 0) & CTX_SWITCH) == iir_set
    assert [a.kind for a in actions] == (["INJECT_MSI"] if msi else [])


def test_turning_the_master_on_with_one_pending_sends_the_msi_and_iir_write_clears(bench):
    _irq_setup(bench, master=False)
    v = bench.mediator.vgpus[1]
    interrupt.trigger_event(v, "rcs", regs.GT_CONTEXT_SWITCH)
    bench.clear_log()
    bench.trap_write(1, regs.MASTER_IRQ, 4, regs.MASTER_IRQ_CONTROL)
    assert len(bench.posts_of("INJECT_MSI")) == 1
    bench.trap_write(1, regs.gt_iir(0), 4, CTX_SWITCH)       # write 1 to clear
    assert not v.vregs[regs.gt_iir(0)] & CTX_SWITCH
    assert not v.vregs[regs.MASTER_IRQ] & 1 << 0


def test_gen8_irq_map_a_blitter_event_reports_through_master_bit_1(bench):
    """gen8_irq_map: GT0 bits 15:0 (render) report through master bit 0, bits 31:16 (blitter)
    through bit 1; the video banks through their own bits."""
    bcs = regs.engine_event("bcs", regs.GT_CONTEXT_SWITCH)[1]
    bench.trap_writes(1, [(regs.gt_ier(0), 4, 0xFFFFFFFF), (regs.gt_imr(0), 4, 0),
                          (regs.gt_ier(1), 4, 0xFFFFFFFF), (regs.gt_imr(1), 4, 0),
                          (regs.MASTER_IRQ, 4, regs.MASTER_IRQ_CONTROL)])
    v = bench.mediator.vgpus[1]
    assert [a.kind for a in interrupt.trigger_event(v, "bcs", regs.GT_CONTEXT_SWITCH)] == ["INJECT_MSI"]
    assert v.vregs[regs.gt_iir(0)] == bcs
    assert v.vregs[regs.MASTER_IRQ] & 0xFF == 1 << 1
    interrupt.trigger_event(v, "vcs", regs.GT_USER_INTERRUPT)
    assert v.vregs[regs.MASTER_IRQ] & 0xFF == (1 << 1) | (1 << 2)


def test_a_masked_event_still_runs_the_pending_check(bench):
    """intel_vgpu_trigger_virtual_event runs check_pending_irq after propagate_event whether or
    not IMR masked the event: an interrupt already pending in IIR and IER goes out."""
    _irq_setup(bench)
    v = bench.mediator.vgpus[1]
    v.vregs[regs.gt_iir(0)] = CTX_SWITCH                    # pending, its master bit not set yet
    v.vregs[regs.MASTER_IRQ] = regs.MASTER_IRQ_CONTROL
    bench.trap_write(1, regs.gt_imr(0), 4, 0xFFFFFFFF)       # everything masked from now on
    actions = interrupt.trigger_event(v, "rcs", regs.GT_USER_INTERRUPT)
    assert [a.kind for a in actions] == ["INJECT_MSI"]
    assert not v.vregs[regs.gt_iir(0)] & regs.GT_USER_INTERRUPT


# ---- PPGTT shadow rules -------------------------------------------------------------------------------
PML4, PDP, PD, PT, DATA = 100, 101, 102, 103, 200
F = lrc.PTE_PRESENT | lrc.PTE_RW


def put(b, gfn, entries: dict[int, int]):
    page = np.zeros(512, dtype="<u8")
    for i, e in entries.items():
        page[i] = e
    b.hv.gpa_write(b.hv.vms[1], [[gfn << PAGE_SHIFT, page.tobytes()]])


def shadow_of(b, mfn):
    return np.frombuffer(bytes(b.mediator.pool.page(mfn)), dtype="<u8")


def build(b, pd_extra=None, pt=None):
    put(b, PML4, {0: lrc.entry(PDP, F)})
    put(b, PDP, {0: lrc.entry(PD, F)})
    put(b, PD, {0: lrc.entry(PT, F), **(pd_extra or {})})
    put(b, PT, pt if pt is not None else {0: lrc.entry(DATA, F), 1: lrc.entry(DATA + 1, F)})
    v = b.mediator.vgpus[1]
    mm = run(b, v.ppgtt.get_mm(lrc.ADDRESSING_LEGACY_64B, [PML4 << PAGE_SHIFT, 0, 0, 0]))
    return v, mm


def table(v, gfn, level):
    return v.ppgtt.tables[(gfn, level)]


def test_rule_4k_entries_hold_machine_frames_and_tables_are_tracked(bench):
    v, mm = build(bench)
    p2m = bench.p2m(1)
    pt = shadow_of(bench, table(v, PT, 3).mfn)
    assert pt[0] == lrc.entry(int(p2m[DATA]), F) and pt[1] == lrc.entry(int(p2m[DATA + 1]), F)
    pd = shadow_of(bench, table(v, PD, 2).mfn)
    assert lrc.frame_of(int(pd[0])) == table(v, PT, 3).mfn
    assert mm.shadow_pdps() == [table(v, PML4, 0).mfn << PAGE_SHIFT]
    assert all(bench.hv.vms[1].track[g] for g in (PML4, PDP, PD, PT))
    assert bench.hv.vms[1].pins[DATA] and bench.hv.vms[1].pins[PT]


def test_rule_never_present_entries_stay_zero_in_the_shadow(bench):
    """ppgtt_populate_spt shadows only present guest entries; a shadow page starts zeroed, so the
    GPU faults on an entry that was never present."""
    v, _ = build(bench)
    assert shadow_of(bench, table(v, PT, 3).mfn)[2] == 0
    assert shadow_of(bench, table(v, PD, 2).mfn)[5] == 0


def test_rule_the_scratch_tree_is_present_in_the_kernels_mode(bench):
    """alloc_scratch_pages: each level's scratch table points at the next one, present and RW."""
    sc = bench.mediator.vgpus[1].scratch
    for level in range(3):
        ents = shadow_of(bench, sc.page[level])
        assert (ents == lrc.entry(sc.page[level + 1], F)).all()
    assert not shadow_of(bench, sc.page[3]).any()
    assert sc.page != bench.mediator.vgpus[2].scratch.page     # each vGPU has its own


def test_rule_an_invalid_gfn_maps_the_scratch_page(bench):
    """ppgtt_populate_spt: a present leaf whose gfn is not guest RAM points at the scratch page
    (present: a GPU access there is absorbed); counted as invalid."""
    v, _ = build(bench, pt={0: lrc.entry(10 ** 7, F)})
    assert shadow_of(bench, table(v, PT, 3).mfn)[0] == lrc.entry(v.scratch.page[3], F)
    assert v.ppgtt.counts["invalid"] == 1


def test_rule_a_2m_entry_is_split_where_its_frames_are_not_contiguous(bench):
    v, mm = build(bench, pd_extra={1: lrc.entry(512, F | lrc.PDE_PS_2M)})
    pd = shadow_of(bench, table(v, PD, 2).mfn)
    split = table(v, PD, 2).children[1]
    assert split.split and not pd[1] & lrc.PDE_PS_2M and lrc.frame_of(int(pd[1])) == split.mfn
    p2m = bench.p2m(1)
    s = shadow_of(bench, split.mfn)
    assert [lrc.frame_of(int(e)) for e in s[:3]] == [int(p2m[512 + k]) for k in range(3)]
    assert v.ppgtt.guest_walk(mm, 0x200000 + 0x1234) == (512 << PAGE_SHIFT) + 0x1234
    assert v.ppgtt.counts["split_2m"] == 1


def tracked(b, gpa, data):
    return b.net.call("hypervisor", "mediator", "TRACKED_WRITE", {"gpa": gpa, "data": data}, 1)


def test_rule_a_tracked_8_byte_write_replaces_the_entry_and_unpins_the_old_page(bench):
    v, _ = build(bench)
    bench.clear_log()
    tracked(bench, (PT << PAGE_SHIFT) + 8, struct.pack("<Q", lrc.entry(DATA + 7, F)))
    pt = shadow_of(bench, table(v, PT, 3).mfn)
    assert pt[1] == lrc.entry(int(bench.p2m(1)[DATA + 7]), F)
    assert DATA + 1 in bench.unpinned_gfns_in_posts()
    assert v.ppgtt.counts["tracked_writes"] == 1


def test_rule_a_4_byte_half_leaves_scratch_until_the_entry_is_shadowed_whole(bench):
    v, _ = build(bench)
    new = lrc.entry(DATA + 9, F)
    tracked(bench, (PT << PAGE_SHIFT) + 16, struct.pack("<I", new & 0xFFFFFFFF))
    t = table(v, PT, 3)
    assert shadow_of(bench, t.mfn)[2] == v.scratch.page[3] << PAGE_SHIFT      # was never present
    assert 2 in t.post_shadow
    tracked(bench, (PT << PAGE_SHIFT) + 20, struct.pack("<I", new >> 32))
    # the hypervisor stores each half once it is emulated; then the next workload flushes
    put(bench, PT, {0: lrc.entry(DATA, F), 1: lrc.entry(DATA + 1, F), 2: new})
    run(bench, v.ppgtt.flush_post_shadow(v.mem.read))
    assert shadow_of(bench, t.mfn)[2] == lrc.entry(int(bench.p2m(1)[DATA + 9]), F) and not t.post_shadow


def test_rule_an_unmapped_table_page_loses_its_shadow_and_its_tracking(bench):
    v, _ = build(bench)
    t = table(v, PT, 3)
    mfn = t.mfn
    tracked(bench, (PD << PAGE_SHIFT), struct.pack("<Q", 0))
    assert (PT, 3) not in v.ppgtt.tables
    assert not bench.hv.vms[1].track[PT] and not bench.hv.vms[1].pins[DATA]
    assert mfn not in bench.mediator.pool.owner and not shadow_of(bench, mfn).any()
    pd = shadow_of(bench, table(v, PD, 2).mfn)
    assert pd[0] == lrc.entry(v.scratch.page[2], F)       # the removed entry: scratch, present
    tracked(bench, (PT << PAGE_SHIFT), struct.pack("<Q", 0))     # no longer tracked: nothing to do
    assert v.ppgtt.counts["tracked_writes"] == 1


def test_a_shared_table_has_one_shadow_freed_with_its_last_ppgtt(bench):
    v, mm = build(bench)
    put(bench, PML4 + 50, {0: lrc.entry(PDP, F)})
    mm2 = run(bench, v.ppgtt.get_mm(lrc.ADDRESSING_LEGACY_64B, [(PML4 + 50) << PAGE_SHIFT, 0, 0, 0]))
    assert table(v, PDP, 1).refs == 2
    run(bench, v.ppgtt.put_mm(mm))
    assert (PDP, 1) in v.ppgtt.tables and (PML4, 0) not in v.ppgtt.tables
    run(bench, v.ppgtt.put_mm(mm2))
    assert not v.ppgtt.tables and not bench.hv.vms[1].track.any()


# ---- the guest, the mediator and the gpu together ------------------------------------------------------
def drive(b, vm, **load):
    g = add_guest(b.net, vm, 16384, SEED, LoadSpec(**{"mode": "closed", "concurrency": 4,
                                                      "duration_s": 1000, **load}))
    box = b.net.spawn(f"guest{vm}", g.boot_and_start(True, None, b.net.now))
    b.net.run(until=lambda: g.state in ("drained", "failed"), max_steps=3_000_000)
    assert g.state == "drained", box
    return g


def test_workloads_run_once_with_their_tokens_in_place_and_nothing_else_changed():
    b = make_bench()
    try:
        b.setup([(1, "_8"), (2, "_8")])
        g = drive(b, 1, mix={"submit": 0.7, "ppgtt-churn": 0.3}, ops=150, batches_per_workload=2)
        w = g.report(b.net.now)["workloads"]
        assert w["submitted"] > 50 and w["completed"] == w["submitted"] and not w["failed"]
        assert not w["misplaced"] and w["churn_ops"] > 10
        ram = b.net.call("launcher", "guest1", "RAM_VERIFY", None, 1, timeout=60)
        assert ram["violations"] == 0 and ram["duplicated"] == 0 and ram["misplaced"] == 0, ram["reasons"]
        assert b.net.call("launcher", "mediator", "POOL_CHECK")["violations"] == 0
        v = b.mediator.vgpus[1]
        assert v.ppgtt.counts["tracked_writes"] > 0 and v.workloads["failed"] == 0
        # each faulting store's WRITE_DONE ended its fault: no page stays faulting, no write is
        # left waiting, and no message made a handler fail on the way
        assert g.ram.faulting == {} and g.writes == {} and g.writes_in_flight == 0
        for name, eng in b.net.engines.items():
            assert eng.stats.total("gvtbench_handler_errors") == 0, name
        assert sum(e.executed for e in b.gpu.engines.values()) >= w["completed"]
        # every shadow page is still there and every workload's shadow buffers were released:
        # the GGTT scratch page, each vGPU's 4-page scratch tree, the PPGTT shadows
        assert b.mediator.pool.in_use() == 1 + 4 * len(b.mediator.vgpus) + v.ppgtt.shadow_pages()
    finally:
        b.close()


def test_a_hang_fails_that_context_only_and_the_other_engine_goes_on():
    b = make_bench()
    try:
        b.setup([(1, "_8"), (2, "_8")])
        g = drive(b, 1, mix={"submit": 1.0}, ops=80, bad_ratio=0.1, hang_timeout_s=0.05)
        rep = g.report(b.net.now)
        w = rep["workloads"]
        assert w["failed"] > 0 and w["failed"] == w["failed_expected"] and not w["lost"]
        # the per-second counts hold every workload retired, and the hangs meant are not failed ops
        tl = rep["timeline"]
        assert sum(tl["workloads"]["failed"]) == w["failed"]
        assert sum(tl["workloads"]["completed"]) == w["completed"]
        assert sum(tl["ops"]["submit"]["completed"]) == w["completed"] + w["failed_expected"]
        assert not any(tl["ops"]["submit"]["failed"])
        assert w["completed"] > 40 and not w["misplaced"]
        v = b.mediator.vgpus[1]
        hangs = [r for r in v.fail_reasons if r.startswith("GPU hang at 0x800000")]
        assert hangs and "not present" in hangs[0]
        assert sum(e.hangs for e in b.gpu.engines.values()) >= 1
        ram = b.net.call("launcher", "guest1", "RAM_VERIFY", None, 1, timeout=60)
        assert ram["violations"] == 0 and ram["duplicated"] == 0, ram["reasons"]
    finally:
        b.close()


def _guest_under_hang_check():
    """A bench with one guest of closed-loop workloads whose hang check fires after 50 ms
    without progress, run until 10 of its workloads completed."""
    b = make_bench()
    b.setup([(1, "_8")])
    g = add_guest(b.net, 1, 16384, SEED, LoadSpec(mode="closed", concurrency=4, duration_s=1000,
                                                  mix={"submit": 1.0}, ops=60, hang_timeout_s=0.05))
    b.net.spawn("guest1", g.boot_and_start(True, None, b.net.now))
    b.net.run(until=lambda: g.wl.counts["completed"] >= 10, max_steps=3_000_000)
    return b, g


def test_a_hang_reset_keeps_the_abandoned_workloads_pages_until_the_gdrst_is_done():
    """A workload the guest's hang check gave up on may still run: GVT-g lets the GPU finish it
    before the GDRST completes. Its batch pages must not serve a new workload before then, or the
    gpu runs the new batch in its name (the hostile run's duplicates under load)."""
    b, g = _guest_under_hang_check()
    wl = g.wl
    try:
        # the gpu hears nothing more from the mediator: the running workloads stall, and the
        # hang check resets the engine
        b.net.hold = lambda s, d, e: s == "mediator" and d == "gpu" and e.kind.startswith("MMIO_WRITE")
        # (the gpu's workloads take time, so the engines stall microseconds apart: each is reset
        # at its own deadline)
        b.net.run(until=lambda: wl.counts["resets"] >= 1 and all(
            e.resetting for e in wl.lay.engines.values() if any(c.inflight for c in e.contexts)),
            max_steps=3_000_000)
        b.net.run(advance=False)
        assert wl.counts["failed"] > 0 and b.net.held
        # the failed workloads' pages stay busy, beside those of the work queued since (which
        # waits for the reset to be done before it is submitted)
        queued = [w for e in wl.lay.engines.values() for c in e.contexts for w in c.inflight]
        assert all(e.resetting for e in wl.lay.engines.values() if e.resets)
        assert all(wl.lay.engines[w.ctx.engine].resetting for w in queued)
        assert len(wl.batch_busy) == (wl.counts["failed"] + len(queued)) * g.load.batches_per_workload
        b.net.release()
        b.net.run(until=lambda: g.state in ("drained", "failed"), max_steps=3_000_000)
        assert g.state == "drained" and not wl.batch_busy and not wl.churn_busy
        ram = b.net.call("launcher", "guest1", "RAM_VERIFY", None, 1, timeout=60)
        assert ram["violations"] == 0 and ram["duplicated"] == 0, ram["reasons"]
    finally:
        b.close()


def test_a_hang_reset_rewinds_the_rings_only_once_the_gdrst_is_done():
    """i915 rewinds a reset engine's contexts (head = tail) after the GDRST completes
    (__intel_engine_reset_bh). A completion the mediator handles before the GDRST writes that
    workload's tail into its context as the ring head; a rewind made before it is overwritten,
    and the next submission runs again what the reset threw away (the gpu kill's duplicated and
    misplaced workloads under load). Here workload A completes on the gpu and its interrupt is
    held until the guest has reset the engine; the GDRST is held while the mediator completes A
    and runs the next queued workload, whose interrupt comes only after the GDRST. The first
    workload of each context after the reset starts where its ring stood at the reset."""
    b, g = _guest_under_hang_check()
    wl = g.wl
    try:
        irq = lambda s, d, e: s == "gpu" and e.kind == "ENGINE_IRQ"     # noqa: E731
        b.net.hold = irq
        b.net.run(until=lambda: wl.counts["resets"] >= 1, max_steps=3_000_000)
        reset = [e for e in wl.lay.engines.values() if e.resets]
        assert reset and all(e.resetting for e in reset)
        # where each reset context's ring stood at the reset: nothing before it may run again
        marks = {c.ctx_id: c.tail for e in reset for c in e.contexts}
        # the GDRST is on its way: it stays back while A's interrupts reach the mediator
        held_irqs, b.net.held = b.net.held, []
        assert held_irqs
        traps = ("TRAP_READ", "TRAP_WRITE", "TRACKED_WRITE")
        let_through = [len(held_irqs)]          # A's interrupts, not the ones that follow

        def hold(s, d, e):
            if irq(s, d, e) and let_through[0]:
                let_through[0] -= 1
                return False
            return (s == "hypervisor" and e.kind in traps) or irq(s, d, e)
        b.net.hold = hold
        v = b.mediator.vgpus[1]
        done = v.workloads["completed"]
        b.net.ready.extend(held_irqs)
        b.net.run(advance=False)
        assert v.workloads["completed"] > done          # A completed before the GDRST
        assert any(w.state == "running" for e in reset for w in v.queues[e.name])   # B runs
        vm = b.hv.vms[1]

        def head(c):
            return struct.unpack("<I", vm.mem.read(int(vm.p2m[c.lrc_gfns[1]]), 4 * lrc.CTX_RING_HEAD, 4))[0]
        assert all(e.resetting for e in reset)
        t_release = b.net.now
        starts: dict[int, int] = {}

        def watch() -> bool:
            for e in reset:
                for w in v.queues[e.name]:
                    if w.created_ns >= t_release:
                        starts.setdefault(w.desc.hi, w.head)
            return g.state in ("drained", "failed")
        b.net.release()
        b.net.run(until=watch, max_steps=3_000_000)
        assert starts and all(starts[ctx] == marks[ctx] for ctx in starts), (starts, marks)
        assert g.state == "drained" and not any(e.resetting for e in reset)
        assert all(head(c) == c.tail for e in reset for c in e.contexts)
        assert wl.counts["failed"] > 0 and wl.counts["completed"] + wl.counts["failed"] == wl.counts["submitted"]
        ram = b.net.call("launcher", "guest1", "RAM_VERIFY", None, 1, timeout=60)
        assert ram["violations"] == 0 and ram["duplicated"] == 0 and ram["misplaced"] == 0, ram["reasons"]
    finally:
        b.close()


def test_an_unknown_command_hangs_only_its_context(bench):
    """The gpu alone: a context whose ring holds an unknown command is reported with its address;
    the engine then runs the next submission."""
    gpu = bench.gpu
    pool = bench.mediator.pool
    ctxs = []
    for k, cmd in enumerate(([0x1F800000, 0], [0, 0])):        # an unknown MI opcode; two NOOPs
        ring = pool.alloc("test ring")
        pool.write(ring, 0, struct.pack(f"<{len(cmd)}I", *cmd))
        lrc_pages = pool.alloc_run(2, "test ctx")
        state = [0] * 64
        state[lrc.CTX_RING_TAIL] = 4 * len(cmd)
        state[lrc.CTX_RING_START] = pool.gm_of(ring)
        state[lrc.CTX_RING_CTL] = lrc.ring_ctl(PAGE_SIZE)
        pool.write(lrc_pages[1], 0, struct.pack("<64I", *state))
        ctxs.append(lrc.descriptor(pool.gm_of(lrc_pages[0]), 0x50 + k))
    elsp = regs.ring("rcs", regs.RING_ELSP)
    for d in ctxs:
        for dw in lrc.elsp_dwords(d):
            bench.net.post("mediator", "gpu", "MMIO_WRITE", {"off": elsp, "size": 4, "val": dw})
    bench.net.run()
    irqs = [m.payload for _s, d, m in bench.net.log if m.kind == "ENGINE_IRQ"]
    assert irqs[0]["faults"] and irqs[0]["faults"][0][0] == 0x50 and "unknown command" in irqs[0]["faults"][0][2]
    assert not irqs[1]["faults"]
    assert [lo & lrc.CSB_CONTEXT_COMPLETE and hi for lo, hi in irqs[1]["csb"]][-1] == 0x51
    assert gpu.engines["rcs"].hangs == 1 and gpu.engines["rcs"].executed == 1


def test_a_guest_cannot_make_the_mediator_queue_workloads_without_bound(bench):
    """A flood of ELSP submissions of a context that never completes (its LRCA maps nothing):
    refused with EINVAL each; and of valid-looking ones past the queue bound: EBUSY."""
    from nodes.mediator import scheduler
    enable_execlists(bench, 1)
    v = bench.mediator.vgpus[1]
    elsp = regs.ring("rcs", regs.RING_ELSP)
    res = bench.trap_writes(1, [(elsp, 4, d) for d in lrc.elsp_dwords(A)])
    assert res["n_errors"] == 1 and "EINVAL" in res["errors"][0]       # the context does not translate
    assert v.failsafe is None                                          # a refusal, not a guest error
    v.queues["rcs"].extend(object() for _ in range(scheduler.QUEUE_MAX - 1))
    res = bench.trap_writes(1, [(elsp, 4, d) for d in lrc.elsp_dwords(A)])
    assert res["n_errors"] == 1 and "EBUSY" in res["errors"][0]
    v.queues["rcs"].clear()

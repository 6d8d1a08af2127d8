"""Shadow lifetimes (gvt/gtt.c, scheduler.c, vgpu.c), each reproduction of the audit as a sans-IO
test on the real cores: resets wait for the GPU before anything is released, PPGTT updates add
before they remove and never leave a live entry on a freed page, a failed shadow gives back
exactly what it took, a vGPU's shadows stay under its quota, failsafe drops page tracking."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from gpuwork import F, HandGuest, seqno_store
from harness import enable_execlists, make_bench, run_task, started_bench
from nodes.hw import PAGE_SHIFT, PAGE_SIZE, cmd, lrc, pvinfo, regs
from nodes.mediator import handlers
from nodes.mediator.pins import GfnPins
from nodes.mediator.translate import get_translator

SEQ = lrc.HWS_SEQNO_INDEX


@pytest.fixture(params=["c", "python"])
def bench(request):
    yield from started_bench(translate=get_translator(request.param))


def seqno(hg, engine="rcs"):
    return hg.u32(hg.hwsp_gpa(engine) + 4 * SEQ)


def owned_pages(b, vgpu: int) -> set[int]:
    tag = f"vgpu{vgpu} "
    return {m for m, what in b.mediator.pool.owner.items() if what.startswith(tag) and "shadow" in what}


def hold_irqs(b) -> None:
    b.net.hold = lambda s, d, e: e.kind == "ENGINE_IRQ"


# ---- resets (intel_gvt_reset_vgpu_locked) ----------------------------------------------------------
@pytest.mark.parametrize("reset", ["engine", "gt", "device"])
def test_a_reset_waits_for_the_workload_on_the_gpu_before_it_releases_its_shadows(bench, reset):
    """The audit's reproduction: a reset freed the in-flight workload's shadow ring and context at
    once and dispatched the next workload, while the gpu still ran the old ELSP; the pages went
    to vGPU 2. Now the reset stops the vGPU's scheduling, waits until the gpu reported the
    workload, and only then fails it and gives its pages back."""
    b = bench
    hg, hg2 = HandGuest(b, 1), HandGuest(b, 2)
    hold_irqs(b)
    res = hg.submit(seqno_store(hg, 1))
    assert res["n_errors"] == 0
    w = b.mediator.scheduler.inflight["rcs"]
    assert w is not None and w.state == "running" and b.net.held
    pages = owned_pages(b, 1)
    assert pages                                        # its shadow ring and context
    if reset == "device":
        box = b.net.spawn("launcher", _call("mediator", "VGPU_RESET", vgpu=1))
    else:
        bit = regs.GRDOM_FULL if reset == "gt" else regs.GRDOM_RENDER
        box = b.net.spawn("hypervisor", _call("mediator", "TRAP_WRITE", _writes([(regs.GDRST, 4, bit)]), vgpu=1))
    b.net.run(advance=False)
    assert not box                                      # the reset waits for the gpu
    assert owned_pages(b, 1) == pages and w.state == "running"
    assert not hg.vgpu.sched_active
    # vGPU 2's workload waits for the engine; it cannot get vGPU 1's pages
    res2 = hg2.submit(seqno_store(hg2, 2), run=False)
    assert res2["n_errors"] == 0
    assert not (owned_pages(b, 2) & pages)
    b.net.release()
    b.net.run(until=lambda: bool(box))
    assert "error" not in box, box
    b.net.run()
    assert w.state == "done" and not owned_pages(b, 1)
    assert hg.vgpu.workloads["failed"] == 1 and any("reset" in r for r in hg.vgpu.fail_reasons)
    assert seqno(hg2, "rcs") == 2                       # vGPU 2 ran, after the engine was free
    assert b.net.call("launcher", "mediator", "POOL_CHECK")["violations"] == 0


def _call(dst, kind, payload=None, vgpu=0):
    from nodes.actions import Call
    return (yield Call(dst, kind, payload, vgpu=vgpu, timeout=60))


def _writes(ws):
    from nodes.wire.schema import pack_write_batch
    return pack_write_batch([w[0] for w in ws], [w[1] for w in ws], [w[2] for w in ws])


def test_an_engine_reset_fails_the_queued_work_and_scheduling_waits_for_execlists(bench):
    """Work queued on the reset engine fails with the reset; the vGPU is not scheduled again until
    the guest enables execlists (i915 does so as it resumes the engine)."""
    b = bench
    hg = HandGuest(b, 1)
    hold_irqs(b)
    hg.submit(seqno_store(hg, 1, "bcs"), engine="bcs")          # on the gpu, its interrupt held
    hg.submit(seqno_store(hg, 9, "bcs"), engine="bcs", k=1, run=False)     # queued behind it
    box = b.net.spawn("hypervisor", _call("mediator", "TRAP_WRITE", _writes([(regs.GDRST, 4, regs.GRDOM_BLT)]),
                                          vgpu=1))
    b.net.run(advance=False)
    b.net.release()
    b.net.run(until=lambda: bool(box))
    b.net.run()
    # the gpu ran the first (its store landed), yet neither completed for the guest
    assert hg.vgpu.workloads["failed"] == 2 and not hg.vgpu.sched_active
    assert seqno(hg, "bcs") == 1
    hg.skip("bcs", 1)
    hg.skip("bcs")
    hg.submit(seqno_store(hg, 2, "bcs"), engine="bcs")
    assert seqno(hg, "bcs") == 1                        # queued, not scheduled
    enable_execlists(b, 1, ("bcs",))
    b.net.run()
    assert seqno(hg, "bcs") == 2


def test_a_full_gt_reset_invalidates_the_ppgtt_shadows_and_their_tracking(bench):
    """gdrst_mmio_write bit 0 (GRDOM_FULL): intel_vgpu_invalidate_ppgtt drops every shadow and its
    write protection, execlists go off with the registers; the PPGTTs themselves stay and are
    shadowed again by the next workload."""
    b = bench
    hg = HandGuest(b, 1)
    assert hg.vgpu.ppgtt.tables and b.hv.vms[1].track.any()
    b.trap_write(1, regs.GDRST, 4, regs.GRDOM_FULL)
    b.net.run()
    v = hg.vgpu
    assert not v.ppgtt.tables and not b.hv.vms[1].track.any() and hg.mm in v.ppgtt.mms.values()
    assert not hg.mm.shadowed and not v.vregs.get(regs.ring("rcs", regs.RING_MODE), 0)
    res = hg.submit(seqno_store(hg, 3))
    assert res["n_errors"] == 1 and "before the guest enabled execlists" in res["errors"][0]
    hg.skip()
    enable_execlists(b, 1)
    b.trap_writes(1, [(regs.ring("rcs", regs.RING_HWS_PGA), 4, hg.hwsp_gm())])
    res = hg.submit(cmd.store_dword(hg.data_va(0), 0xAB) + seqno_store(hg, 4))
    assert res["n_errors"] == 0 and seqno(hg) == 4 and hg.u32(hg.data_gpa(0)) == 0xAB
    assert hg.mm.shadowed and b.hv.vms[1].track[hg.pt1]


def test_an_engine_reset_leaves_the_ppgtt_shadows(bench):
    b = bench
    hg = HandGuest(b, 1)
    tables = dict(hg.vgpu.ppgtt.tables)
    b.trap_write(1, regs.GDRST, 4, regs.GRDOM_RENDER)
    b.net.run()
    assert hg.vgpu.ppgtt.tables == tables and hg.mm.shadowed


# ---- PPGTT updates (ppgtt_handle_guest_write_page_table) ----------------------------------------------
def tracked(b, gpa, data, vgpu=1):
    return b.net.call("hypervisor", "mediator", "TRACKED_WRITE", {"gpa": gpa, "data": data}, vgpu)


def test_a_pde_to_a_gfn_that_is_not_ram_is_refused_and_the_live_shadow_stays(bench):
    """The audit's reproduction: the old code linked an empty child before it checked the gfn;
    rewriting the PDE then raised IndexError after the child's page was freed, leaving a live
    PDE on a free page that the next allocation gave to vGPU 2. Now the child is built first:
    the gfn is refused (EINVAL, as page tracking refuses it), and nothing changes."""
    b = bench
    hg = HandGuest(b, 1)
    v = hg.vgpu
    pd = v.ppgtt.tables[(hg.pd, 2)]
    before_page = bytes(b.mediator.pool.page(pd.mfn))
    used = b.mediator.pool.used[1]
    with pytest.raises(Exception) as e:
        tracked(b, (hg.pd << PAGE_SHIFT) + 8 * 5, struct.pack("<Q", lrc.entry(10 ** 7, F)))
    assert "EINVAL" in str(e.value)
    assert bytes(b.mediator.pool.page(pd.mfn)) == before_page and b.mediator.pool.used[1] == used
    # the rewrite of that entry to a real table works, with no leftover of the failed one
    tracked(b, (hg.pd << PAGE_SHIFT) + 8 * 5, struct.pack("<Q", lrc.entry(hg.pt1, F)))
    assert pd.children[5] is v.ppgtt.tables[(hg.pt1, 3)] and pd.children[5].refs == 2
    res = b.net.call("launcher", "mediator", "POOL_CHECK")
    assert res["violations"] == 0, res["reasons"]
    # vGPU 2's new tables never take a page vGPU 1's live tree points at
    HandGuest(b, 2)
    live = {t.mfn for t in v.ppgtt.tables.values()}
    assert not live & {t.mfn for t in b.mediator.vgpus[2].ppgtt.tables.values()}


def test_a_rewrite_with_the_entrys_own_value_changes_nothing(bench):
    """The audit found 3 untracks, 3 retracks, 4 pins and 3 unpins for one PML4 entry rewritten
    with its own value."""
    b = bench
    hg = HandGuest(b, 1)
    tables = {k: id(t) for k, t in hg.vgpu.ppgtt.tables.items()}
    b.clear_log()
    tracked(b, hg.pml4 << PAGE_SHIFT, struct.pack("<Q", lrc.entry(hg.pdp, F)))
    tracked(b, hg.pt1 << PAGE_SHIFT, struct.pack("<Q", lrc.entry(hg.data_gfns[0], F)))
    kinds = {e.kind for _s, _d, e in b.net.log}
    assert not kinds & {"PAGE_TRACK", "GFN_PIN", "GFN_UNPIN"}, kinds
    assert {k: id(t) for k, t in hg.vgpu.ppgtt.tables.items()} == tables


def test_a_new_pde_is_linked_before_the_old_child_goes(bench):
    """Moving a PD entry from one PT to another: the new child is found (shared, referenced),
    linked, then the old one released; between the two the live entry never points at a freed
    page."""
    b = bench
    hg = HandGuest(b, 1)
    v = hg.vgpu
    pd = v.ppgtt.tables[(hg.pd, 2)]
    pt0 = v.ppgtt.tables[(hg.pt0, 3)]
    tracked(b, (hg.pd << PAGE_SHIFT) + 8 * 1, struct.pack("<Q", lrc.entry(hg.pt0, F)))
    assert pd.children[1] is pt0 and pt0.refs == 2 and (hg.pt1, 3) not in v.ppgtt.tables
    se = struct.unpack_from("<Q", b.mediator.pool.page(pd.mfn), 8)[0]
    assert lrc.frame_of(se) == pt0.mfn


def test_a_failed_shadow_gives_back_exactly_what_it_took(bench):
    """The audit's reproduction: cleanup released pins it never took (a sibling's count went to
    -1) and five failed shadows leaked five pool pages. A PD whose second PT is not RAM fails the
    whole PPGTT; every page, pin and write protection taken is given back, five times over."""
    b = bench
    enable_execlists(b, 1)
    v = b.mediator.vgpus[1]
    pml4, pdp, pd, pt = 100, 101, 102, 103
    hv = b.hv.vms[1]

    def put(gfn, ents):
        page = np.zeros(512, dtype="<u8")
        for i, e in ents.items():
            page[i] = e
        b.hv.gpa_write(hv, [[gfn << PAGE_SHIFT, page.tobytes()]])
    put(pml4, {0: lrc.entry(pdp, F)})
    put(pdp, {0: lrc.entry(pd, F)})
    put(pd, {0: lrc.entry(pt, F), 1: lrc.entry(10 ** 7, F)})
    put(pt, {0: lrc.entry(200, F), 1: lrc.entry(201, F)})
    used = b.mediator.pool.used.get(1, 0)
    for _ in range(5):
        with pytest.raises(Exception) as e:
            run_task(b, v.ppgtt.get_mm(lrc.ADDRESSING_LEGACY_64B, [pml4 << PAGE_SHIFT, 0, 0, 0]))
        assert "EINVAL" in str(e.value)
    b.net.run()                                         # the unpins are posted: let them land
    assert b.mediator.pool.used.get(1, 0) == used and not v.ppgtt.tables
    assert not hv.pins.any() and not hv.track.any()
    assert (v.pins.refs == 0).all() and not v.pins.count()


def test_pins_released_more_than_held_are_a_loud_internal_error():
    p = GfnPins(1, 16, "hypervisor")
    p.hold(np.array([3, 3]))
    p.release(np.array([3]))
    with pytest.raises(RuntimeError, match="released 2 times, held 1"):
        p.release(np.array([3, 3]))
    assert p.refs[3] == 1                               # nothing changed


def test_a_1gib_pdpe_is_refused(bench):
    """ppgtt_populate_shadow_entry: GVT-g does not shadow 1 GiB pages (EINVAL)."""
    b = bench
    hg = HandGuest(b, 1)
    with pytest.raises(Exception) as e:
        tracked(b, (hg.pdp << PAGE_SHIFT) + 8, struct.pack("<Q", lrc.entry(0x40000, F | lrc.PDE_PS_2M)))
    assert "1 GiB" in str(e.value)


def test_a_zero_legacy_root_is_not_shadowed_as_gfn_0(bench):
    b = bench
    v = b.mediator.vgpus[1]
    pd = 300
    b.hv.gpa_write(b.hv.vms[1], [[pd << PAGE_SHIFT, bytes(4096)]])
    mm = run_task(b, v.ppgtt.get_mm(lrc.ADDRESSING_LEGACY_32B, [pd << PAGE_SHIFT, 0, 0, 0]))
    assert [t is not None for t in mm.roots] == [True, False, False, False]
    assert mm.shadow_pdps()[1:] == [0, 0, 0] and (0, 2) not in v.ppgtt.tables
    assert not b.hv.vms[1].pins[0] and not b.hv.vms[1].track[0]


def test_64k_ips_entries_are_split_into_16_4k_entries(bench):
    """split_64KB_gtt_entry: with 64 KiB pages enabled (GAMW_ECO_DEV_RW_IA), a PT its PDE marks
    IPS has a 64 KiB page in every 16th entry; each is shadowed as 16 4 KiB entries."""
    b = bench
    hg = HandGuest(b, 1)
    v = hg.vgpu
    b.trap_write(1, regs.GAMW_ECO_DEV_RW_IA, 4, regs.GAMW_ECO_ENABLE_64K_IPS_FIELD)
    assert handlers.ips_enabled(v)
    ips_pt, base = 400, 0x1000                          # 16 guest pages from gfn 0x1000
    page = np.zeros(512, dtype="<u8")
    page[16] = lrc.entry(base, F)
    b.hv.gpa_write(b.hv.vms[1], [[ips_pt << PAGE_SHIFT, page.tobytes()]])
    tracked(b, (hg.pd << PAGE_SHIFT) + 8 * 2, struct.pack("<Q", lrc.entry(ips_pt, F | lrc.PDE_IPS_64K)))
    t = v.ppgtt.tables[(ips_pt, 3)]
    assert t.ips
    shadow = np.frombuffer(bytes(b.mediator.pool.page(t.mfn)), dtype="<u8")
    p2m = b.hv.vms[1].p2m
    assert [lrc.frame_of(int(e)) for e in shadow[16:32]] == [int(p2m[base + k]) for k in range(16)]
    assert not shadow[:16].any() and not shadow[32:].any()
    pd_se = struct.unpack_from("<Q", b.mediator.pool.page(v.ppgtt.tables[(hg.pd, 2)].mfn), 16)[0]
    assert not pd_se & lrc.PDE_IPS_64K                  # the shadow PDE never says IPS
    assert v.ppgtt.counts["split_64k"] == 1


def test_the_fault_mode_leaves_every_entry_that_maps_no_ram_not_present():
    b = make_bench(scratch="fault")
    try:
        b.setup([(1, "_8"), (2, "_8")])
        hg = HandGuest(b, 1)
        v = hg.vgpu
        for level in range(3):
            assert not any(b.mediator.pool.page(v.scratch.page[level]))
        page = np.zeros(512, dtype="<u8")
        page[1] = lrc.entry(10 ** 7, F)                 # a new PT with an entry that is not RAM
        b.hv.gpa_write(b.hv.vms[1], [[500 << PAGE_SHIFT, page.tobytes()]])
        tracked(b, (hg.pd << PAGE_SHIFT) + 8 * 2, struct.pack("<Q", lrc.entry(500, F)))
        tracked(b, hg.pt1 << PAGE_SHIFT, struct.pack("<Q", 0))                              # removed
        shadow = np.frombuffer(bytes(b.mediator.pool.page(v.ppgtt.tables[(hg.pt1, 3)].mfn)), dtype="<u8")
        assert not shadow[0] & lrc.PTE_PRESENT
        fresh = np.frombuffer(bytes(b.mediator.pool.page(v.ppgtt.tables[(500, 3)].mfn)), dtype="<u8")
        assert not fresh[1] & lrc.PTE_PRESENT
        # a GPU store through the removed entry faults instead of landing in the scratch page
        hg.submit(cmd.store_dword(hg.data_va(0), 1) + seqno_store(hg, 5))
        assert any("not present" in r for r in v.fail_reasons) and not any(b.mediator.pool.page(v.scratch.page[3]))
    finally:
        b.close()


def test_the_kernels_mode_absorbs_a_store_through_a_removed_entry_in_the_scratch_page(bench):
    b = bench
    hg = HandGuest(b, 1)
    v = hg.vgpu
    tracked(b, hg.pt1 << PAGE_SHIFT, struct.pack("<Q", 0))
    res = hg.submit(cmd.store_dword(hg.data_va(0, 12), 0x5C) + seqno_store(hg, 6))
    assert res["n_errors"] == 0 and seqno(hg) == 6
    assert struct.unpack_from("<I", b.mediator.pool.page(v.scratch.page[3]), 12)[0] == 0x5C
    assert hg.u32(hg.data_gpa(0, 12)) == 0
    check = b.net.call("launcher", "mediator", "POOL_CHECK")
    assert check["violations"] == 0 and check["scratch_dirty"] == {"vGPU 1's scratch page": 1}


# ---- the host pool: quota and reclaim (reclaim_one_ppgtt_mm) -----------------------------------------
def test_a_g2v_create_flood_stays_under_its_quota_and_the_neighbour_runs():
    """The audit's reproduction: a guest that created PPGTTs through g2v_notify held 3953 of the
    4096 pool pages and its neighbour then failed its batches with ENOMEM. Each vGPU has a quota;
    PPGTTs no workload runs on give their shadow back (least recently used first)."""
    b = make_bench(shadow_quota=64)
    try:
        b.setup([(1, "_8"), (2, "_8")])
        hg2 = HandGuest(b, 2)
        enable_execlists(b, 1)
        hv = b.hv.vms[1]
        for k in range(40):                             # 40 PPGTTs of 4 tables each: 160 pages
            pml4, pdp, pd, pt = (1000 + 4 * k + j for j in range(4))
            for g, child in ((pml4, pdp), (pdp, pd), (pd, pt)):
                page = np.zeros(512, dtype="<u8")
                page[0] = lrc.entry(child, F)
                b.hv.gpa_write(hv, [[g << PAGE_SHIFT, page.tobytes()]])
            b.hv.gpa_write(hv, [[pt << PAGE_SHIFT, bytes(4096)]])
            b.trap_writes(1, [(pvinfo.BASE + pvinfo.PDP0_LO, 4, (pml4 << PAGE_SHIFT) & 0xFFFFFFFF),
                              (pvinfo.BASE + pvinfo.PDP0_LO + 4, 4, 0),
                              (pvinfo.BASE + pvinfo.G2V_NOTIFY, 4, pvinfo.G2V_PPGTT_L4_CREATE)])
        v1 = b.mediator.vgpus[1]
        assert b.mediator.pool.used[1] <= 64 and v1.ppgtt.counts["reclaimed"] > 0
        assert len(v1.ppgtt.mms) == 40
        for k in range(20):                             # the neighbour's work is untouched
            hg2.submit(seqno_store(hg2, k + 1))
        assert seqno(hg2) == 20 and not b.mediator.vgpus[2].fail_reasons
    finally:
        b.close()


def test_the_mediator_refuses_a_pool_too_small_for_its_quotas():
    with pytest.raises(Exception, match="do not fit"):
        make_bench(shadow_quota=4000)


# ---- failsafe (intel_vgpu_page_track_handler, enter_failsafe_mode) -----------------------------------
def test_in_failsafe_a_tracked_write_drops_the_write_protection_and_is_not_emulated(bench):
    b = bench
    hg = HandGuest(b, 1)
    v = hg.vgpu
    pt1 = v.ppgtt.tables[(hg.pt1, 3)]
    before = bytes(b.mediator.pool.page(pt1.mfn))
    v.enter_failsafe(handlers.FAILSAFE_GUEST_ERR)
    assert b.hv.vms[1].track[hg.pt1]
    tracked(b, hg.pt1 << PAGE_SHIFT, struct.pack("<Q", lrc.entry(hg.data_gfns[5], F)))
    assert not b.hv.vms[1].track[hg.pt1] and bytes(b.mediator.pool.page(pt1.mfn)) == before
    assert v.ppgtt.counts["tracked_writes"] == 0


def test_a_vgpu_entering_failsafe_fails_its_queued_work_with_a_reason(bench):
    """Queued workloads were stranded (never run, never failed: the ledger would call them
    lost)."""
    b = bench
    hg = HandGuest(b, 1)
    hold_irqs(b)
    hg.submit(seqno_store(hg, 1))
    hg.submit(seqno_store(hg, 2), k=1, run=False)
    assert len(hg.vgpu.queues["rcs"]) == 2
    b.trap_write(1, regs.ring("rcs", regs.RING_MODE), 4, regs.masked_enable(regs.GFX_MODE_BIT0))
    b.net.run(advance=False)
    v = hg.vgpu
    assert v.failsafe == handlers.FAILSAFE_UNSUPPORTED_GUEST
    assert v.workloads["failed"] == 1 and any("entered failsafe" in r for r in v.fail_reasons)
    b.net.release()
    b.net.run()
    assert v.workloads["failed"] == 2 and v.workloads["completed"] == 0    # no emulation in failsafe
    assert not owned_pages(b, 1)


# ---- the engine interrupt and the lite restore ---------------------------------------------------------
def test_a_lite_restore_that_comes_while_the_gpu_reports_starts_at_the_last_tail(bench):
    """The workload the gpu reported stays at its queue's head until its completion has run: a
    lite restore created meanwhile starts from its tail, not from the guest context's head (not
    written back yet), so no command runs twice."""
    b = bench
    hg = HandGuest(b, 1)
    hold_irqs(b)
    hg.submit(cmd.atomic(hg.hwsp_gm() + 0x400, "inc", ggtt=True) + seqno_store(hg, 1))
    w1 = b.mediator.scheduler.inflight["rcs"]
    tail1 = w1.tail
    # the second submission of the same context reaches the mediator, then the first's interrupt
    hg.submit(cmd.atomic(hg.hwsp_gm() + 0x400, "inc", ggtt=True) + seqno_store(hg, 2), run=False)
    w2 = hg.vgpu.queues["rcs"][-1]
    assert w2.head == tail1
    b.net.release()
    b.net.run()
    assert seqno(hg) == 2 and hg.u32(hg.hwsp_gpa() + 0x400) == 2     # each ran once
    assert hg.vgpu.workloads["completed"] == 2


def test_the_interrupt_of_a_workload_does_not_wait_for_its_vgpus_lane(bench):
    b = bench
    assert b.mediator.lane(type("E", (), {"kind": "ENGINE_IRQ", "vgpu": 1})()) is None


def test_a_tracked_pte_to_a_gfn_that_is_not_ram_fails_and_the_old_shadow_stays(bench):
    """ppgtt_handle_guest_entry_add -> ppgtt_populate_shadow_entry: the DMA map of a gfn that is
    not guest RAM fails (ENXIO); unlike a table's first population, which maps it to scratch."""
    b = bench
    hg = HandGuest(b, 1)
    t = hg.vgpu.ppgtt.tables[(hg.pt1, 3)]
    before = bytes(b.mediator.pool.page(t.mfn))
    with pytest.raises(Exception) as e:
        tracked(b, (hg.pt1 << PAGE_SHIFT) + 8 * 3, struct.pack("<Q", lrc.entry(10 ** 7, F)))
    assert "ENXIO" in str(e.value)
    assert bytes(b.mediator.pool.page(t.mfn)) == before and int(t.held[3]) == hg.data_gfns[3]


def test_a_guest_cannot_make_the_mediator_keep_failure_reasons_without_bound(bench):
    """Each hang names its address, which the guest chooses: past FAIL_REASONS_MAX distinct
    reasons the rest are counted together, so the vGPU's STATS stay bounded."""
    from nodes.mediator.scheduler import FAIL_REASONS_MAX
    hg = HandGuest(bench, 1)
    v = hg.vgpu
    n = FAIL_REASONS_MAX + 8
    for k in range(n):
        # a non-privileged batch that stores where its PPGTT maps nothing: a hang at that address
        batch = hg.put_batch(0, cmd.store_dword(0x4000_0000 + k * PAGE_SIZE, k) + [cmd.MI_BATCH_BUFFER_END.header()])
        hg.submit(cmd.bb_start(batch))
        hg.skip()
        bench.trap_writes(1, [(regs.GDRST, 4, regs.GRDOM_RENDER),
                              (regs.ring("rcs", regs.RING_MODE), 4,
                               regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE))])
        bench.net.run()
    assert v.workloads["failed"] == n and v.failsafe is None
    assert len(v.fail_reasons) == FAIL_REASONS_MAX + 1
    assert v.fail_reasons["(other reasons)"] == n - FAIL_REASONS_MAX
    assert sum(v.fail_reasons.values()) == n

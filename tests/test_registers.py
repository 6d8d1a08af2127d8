"""Register semantics as GVT-g has them (drivers/gpu/drm/i915/gvt/handlers.c, interrupt.c,
mmio.c, vgpu.c, aperture_gm.c), one test per rule, against the real mediator, hypervisor and gpu
cores. The GGTT rules are in test_ggtt_rules.py."""
from __future__ import annotations

import pytest

from harness import Bench, run_task, started_bench
from nodes.core import Ctx
from nodes.errors import GvtError
from nodes.hw import MiB, gtt, pvinfo, regs
from nodes.mediator import mmio
from nodes.mediator.aperture import GmAllocator

ENGINES = list(regs.ENGINES)


def rd(b: Bench, off: int, size: int = 4, vgpu: int = 1) -> int:
    return b.trap_read(vgpu, off, size)


def wr(b: Bench, off: int, val: int, size: int = 4, vgpu: int = 1) -> dict:
    res = b.trap_write(vgpu, off, size, val)
    assert res["n_errors"] == 0, res["errors"]
    return res


def pv_aware(b: Bench, vgpu: int = 1) -> None:
    rd(b, pvinfo.BASE + pvinfo.MAGIC_OFF, 8, vgpu)


def vregs(b: Bench, vgpu: int = 1) -> dict:
    return b.mediator.vgpus[vgpu].vregs


# ---- 1. GT IIR registers are write-1-to-clear -------------------------------------------------------
@pytest.mark.parametrize("isr", regs.IRQ_ISRS)
def test_iir_is_write_1_to_clear(bench, isr):
    iir = isr + regs.IIR_OFF
    vregs(bench)[iir] = 0b1111_0000_1010              # events the GPU raised
    wr(bench, iir, 0b0000_0000_1000)
    assert rd(bench, iir) == 0b1111_0000_0010
    wr(bench, iir, 0)                                 # writing 0 clears nothing
    assert rd(bench, iir) == 0b1111_0000_0010
    wr(bench, iir, 0xFFFFFFFF)
    assert rd(bench, iir) == 0


# ---- 2. master interrupt register: only bit 31 is the guest's --------------------------------------
def test_master_irq_only_bit_31_is_writable(bench):
    vregs(bench)[regs.MASTER_IRQ] = 0x0000_0001      # a pending GT interrupt, reported by hardware
    wr(bench, regs.MASTER_IRQ, 0xFFFF_FFFF)
    assert rd(bench, regs.MASTER_IRQ) == regs.MASTER_IRQ_CONTROL | 1
    wr(bench, regs.MASTER_IRQ, 0)
    assert rd(bench, regs.MASTER_IRQ) == 1


# ---- 3. the CSB pointer is masked, and the guest may reset its write pointer -----------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_csb_pointer_takes_the_guests_reset(bench, engine):
    ptr = regs.ring(engine, regs.RING_CSB_PTR)
    assert rd(bench, ptr) == regs.CSB_PTR_RESET                 # write 7, read 0
    wr(bench, ptr, regs.csb_ptr_guest_reset())                  # i915 reset_csb_pointers
    assert rd(bench, ptr) == 0x505
    wr(bench, ptr, 0x0302)                                      # no mask bits: no change
    assert rd(bench, ptr) == 0x505
    wr(bench, ptr, (0x0700 << 16) | 0x0200)                     # the read pointer alone
    assert rd(bench, ptr) == 0x205


# ---- 4. register attributes on every engine ------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_ring_attributes_hold_on_every_engine(bench, engine):
    pv_aware(bench)
    mode = regs.ring(engine, regs.RING_MODE)
    wr(bench, mode, regs.GFX_MODE_RUN_LIST_ENABLE)             # no mask bit: no change
    assert rd(bench, mode) == 0
    wr(bench, mode, regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE))
    assert rd(bench, mode) == regs.GFX_MODE_RUN_LIST_ENABLE
    wr(bench, mode, (0x0201 << 16) | 0x0200)                    # mask selects exactly the bits
    assert rd(bench, mode) == regs.GFX_MODE_RUN_LIST_ENABLE | regs.GFX_MODE_PPGTT_ENABLE
    for rel, size in ((regs.RING_EXECLIST_STATUS, 8), (regs.RING_CSB, regs.RING_CSB_SIZE)):
        for k in range(0, size, 4):
            off = regs.ring(engine, rel) + k
            wr(bench, off, 0xDEADBEEF)
            assert rd(bench, off) == 0                         # read-only
    mi_mode = regs.ring(engine, regs.RING_MI_MODE)
    wr(bench, mi_mode, 0x0100)
    assert rd(bench, mi_mode) == 0
    wr(bench, mi_mode, regs.masked_enable(0x0100))
    assert rd(bench, mi_mode) == 0x0100
    assert bench.mediator.vgpus[1].failsafe is None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bit", [regs.GFX_MODE_RUN_LIST_ENABLE, regs.GFX_MODE_PPGTT_ENABLE])
def test_enabling_execlists_or_ppgtt_before_the_pv_page_is_failsafe_on_every_engine(bench, engine, bit):
    wr(bench, regs.ring(engine, regs.RING_MODE), regs.masked_enable(bit))
    assert bench.mediator.vgpus[1].failsafe == "unsupported_guest"
    assert bench.mediator.vgpus[2].failsafe is None            # the other vGPU runs on


# ---- 5. GFX_MODE bit 0 ----------------------------------------------------------------------------
def test_gfx_mode_bit0_enable_is_stripped_and_sends_to_failsafe(bench):
    pv_aware(bench)
    mode = regs.ring("rcs", regs.RING_MODE)
    wr(bench, mode, regs.masked_enable(regs.GFX_MODE_BIT0 | regs.GFX_MODE_RUN_LIST_ENABLE))
    assert bench.mediator.vgpus[1].failsafe == "unsupported_guest"
    v = vregs(bench)[mode]
    assert v & regs.GFX_MODE_RUN_LIST_ENABLE and not v & regs.GFX_MODE_BIT0   # the rest landed


def test_gfx_mode_bit0_disable_is_allowed(bench):
    pv_aware(bench)
    wr(bench, regs.ring("rcs", regs.RING_MODE), regs.masked_disable(regs.GFX_MODE_BIT0))
    assert bench.mediator.vgpus[1].failsafe is None


# ---- 6. PV info page writes ----------------------------------------------------------------------
def pv(off: int) -> int:
    return pvinfo.BASE + off


def test_pv_cursor_hot_spots_read_all_ones_and_are_writable(bench):
    assert rd(bench, pv(pvinfo.CURSOR_X_HOT)) == 0xFFFFFFFF
    assert rd(bench, pv(pvinfo.CURSOR_Y_HOT)) == 0xFFFFFFFF
    wr(bench, pv(pvinfo.CURSOR_X_HOT), 12)
    wr(bench, pv(pvinfo.CURSOR_Y_HOT), 34)
    assert rd(bench, pv(pvinfo.CURSOR_X_HOT)) == 12 and rd(bench, pv(pvinfo.CURSOR_Y_HOT)) == 34


@pytest.mark.parametrize("k", range(4))
def test_pv_write_to_rsv5_is_failsafe_insufficient_resource(bench, k):
    before = rd(bench, pv(pvinfo.RSV5 + 4 * k))
    wr(bench, pv(pvinfo.RSV5 + 4 * k), 1)
    assert bench.mediator.vgpus[1].failsafe == "insufficient_resource"
    assert vregs(bench).get(pv(pvinfo.RSV5 + 4 * k), 0) == before     # not written


def test_pv_writes_of_any_size_land(bench):
    wr(bench, pv(pvinfo.PDP0_LO), 0xABCD_0000_1234_5000, 8)
    assert rd(bench, pv(pvinfo.PDP0_LO), 8) == 0xABCD_0000_1234_5000
    wr(bench, pv(pvinfo.PDP0_LO), 0x5000, 8)      # a PML4 in guest RAM, for the notification
    wr(bench, pv(pvinfo.G2V_NOTIFY), pvinfo.G2V_PPGTT_L4_CREATE, 2)
    assert rd(bench, pv(pvinfo.G2V_NOTIFY)) == pvinfo.G2V_PPGTT_L4_CREATE
    assert bench.mediator.vgpus[1].g2v_notifications == [pvinfo.G2V_PPGTT_L4_CREATE]
    wr(bench, pv(pvinfo.DISPLAY_READY), 1, 1)
    assert rd(bench, pv(pvinfo.DISPLAY_READY)) == 1
    wr(bench, pv(pvinfo.EXECLIST_DESC_HI), 0x55)
    assert rd(bench, pv(pvinfo.EXECLIST_DESC_HI)) == 0x55


@pytest.mark.parametrize("off", [pvinfo.MAGIC_OFF, pvinfo.VERSION_MAJOR_OFF, pvinfo.VGT_ID,
                                 pvinfo.VGT_CAPS, pvinfo.AVAIL_MAPPABLE_BASE,
                                 pvinfo.AVAIL_NONMAPPABLE_SIZE, pvinfo.AVAIL_FENCE_NUM,
                                 pvinfo.PDP0_LO + 2])
def test_pv_writes_elsewhere_are_ignored(bench, off):
    before = rd(bench, pv(off & ~3))
    writes = [(pv(off), 2, 0x1234)] + ([(pv(off), 4, 0x12345678)] if off % 4 == 0 else [])
    bench.trap_writes(1, writes)
    assert rd(bench, pv(off & ~3)) == before
    assert rd(bench, pv(pvinfo.MAGIC_OFF), 8) == pvinfo.MAGIC
    assert bench.mediator.vgpus[1].failsafe is None


def test_pv_info_page_content(bench):
    for vgpu in (1, 2):
        part = bench.mediator.vgpus[vgpu].part
        assert rd(bench, pv(pvinfo.MAGIC_OFF), 8, vgpu) == 0x4776544776544776
        assert rd(bench, pv(pvinfo.VERSION_MAJOR_OFF), 2, vgpu) == 1
        assert rd(bench, pv(pvinfo.VERSION_MINOR_OFF), 2, vgpu) == 0
        assert rd(bench, pv(pvinfo.VGT_ID), 4, vgpu) == vgpu
        assert rd(bench, pv(pvinfo.VGT_CAPS), 4, vgpu) == (1 << 2) | (1 << 3) | (1 << 4)
        assert rd(bench, pv(pvinfo.AVAIL_MAPPABLE_BASE), 4, vgpu) == part.aperture_base
        assert rd(bench, pv(pvinfo.AVAIL_MAPPABLE_SIZE), 4, vgpu) == 64 * MiB
        assert rd(bench, pv(pvinfo.AVAIL_NONMAPPABLE_BASE), 4, vgpu) == part.hidden_base
        assert rd(bench, pv(pvinfo.AVAIL_NONMAPPABLE_SIZE), 4, vgpu) == 384 * MiB
        assert rd(bench, pv(pvinfo.AVAIL_FENCE_NUM), 4, vgpu) == 4
        assert bench.mediator.vgpus[vgpu].pv_notified


# ---- 7. GDRST performs a reset -------------------------------------------------------------------
def _dirty(b: Bench) -> None:
    pv_aware(b)
    wr(b, regs.ring("rcs", regs.RING_MODE), regs.masked_enable(regs.GFX_MODE_RUN_LIST_ENABLE))
    wr(b, regs.RCS_GPR0, 0x1234)
    for e in ENGINES:
        wr(b, regs.ring(e, regs.RING_CSB_PTR), regs.csb_ptr_guest_reset())
    wr(b, regs.gt_imr(0), 0x0F0F)
    wr(b, pv(pvinfo.CURSOR_X_HOT), 7)
    wr(b, pv(pvinfo.DISPLAY_READY), 1)
    wr(b, pv(pvinfo.G2V_NOTIFY), pvinfo.G2V_PPGTT_L4_CREATE)


def test_gdrst_full_reset_restores_engine_registers_and_the_pv_page(bench):
    _dirty(bench)
    i = gtt.index_of_gm(bench.mediator.vgpus[1].part.aperture_base)
    bench.ggtt_write(1, i, gtt.encode(5, 3))
    phys = bench.phys(i)
    wr(bench, regs.GDRST, regs.GRDOM_FULL)
    assert rd(bench, regs.GDRST) == 0                                   # the acknowledgement
    assert rd(bench, regs.ring("rcs", regs.RING_MODE)) == 0             # below 0x44200: reset
    assert rd(bench, regs.RCS_GPR0) == 0
    for e in ENGINES:
        assert rd(bench, regs.ring(e, regs.RING_CSB_PTR)) == regs.CSB_PTR_RESET
    assert rd(bench, regs.gt_imr(0)) == 0x0F0F                          # above: kept
    assert rd(bench, pv(pvinfo.CURSOR_X_HOT)) == 0xFFFFFFFF            # PV page repopulated
    assert rd(bench, pv(pvinfo.DISPLAY_READY)) == 0
    assert rd(bench, pv(pvinfo.G2V_NOTIFY)) == pvinfo.G2V_PPGTT_L4_CREATE   # not a PV field it sets
    assert rd(bench, pv(pvinfo.MAGIC_OFF), 8) == pvinfo.MAGIC
    v = bench.mediator.vgpus[1]
    assert v.pv_notified and v.failsafe is None                         # a GT reset keeps both
    assert bench.phys(i) == phys and bench.ggtt_read(1, i) == gtt.encode(5, 3)   # GGTT untouched


def test_gdrst_engine_bits_reset_only_those_engines(bench):
    _dirty(bench)
    wr(bench, regs.GDRST, regs.GRDOM_BLT | regs.GRDOM_VECS)
    assert rd(bench, regs.GDRST) == 0
    assert rd(bench, regs.ring("bcs", regs.RING_CSB_PTR)) == regs.CSB_PTR_RESET
    assert rd(bench, regs.ring("vecs", regs.RING_CSB_PTR)) == regs.CSB_PTR_RESET
    assert rd(bench, regs.ring("rcs", regs.RING_CSB_PTR)) == 0x505
    assert rd(bench, regs.ring("vcs", regs.RING_CSB_PTR)) == 0x505
    assert rd(bench, regs.RCS_GPR0) == 0x1234                           # no GT reset
    assert rd(bench, pv(pvinfo.CURSOR_X_HOT)) == 7


# ---- 8. a device-model reset of one vGPU -----------------------------------------------------------
def test_device_model_reset_message_resets_the_whole_vgpu(bench):
    _dirty(bench)
    wr(bench, regs.RCS_GPR0, 0x77, vgpu=2)
    v = bench.mediator.vgpus[1]
    i = gtt.index_of_gm(v.part.aperture_base)
    bench.ggtt_write(1, i, gtt.encode(5, 3))
    wr(bench, regs.fence_lo(1), 0xAAAA_0000_BBBB_0000, 8)
    wr(bench, regs.ring("rcs", regs.RING_MODE), regs.masked_enable(regs.GFX_MODE_BIT0))
    assert v.failsafe == "unsupported_guest"
    bench.clear_log()
    info = bench.control("VGPU_RESET", vgpu=1)
    assert info["failsafe"] is None and info["pv_notified"] is False
    assert not v.pv_notified
    assert bench.phys(i) == gtt.encode(bench.mediator.scratch_mfn, gtt.PTE_PRESENT)
    # gfn 5 held by the GGTT; the PPGTT _dirty's notification created has a zero root, which is
    # not present, so nothing of it was shadowed or pinned
    assert bench.hv.vms[1].pins[5] == 0 and sorted(bench.unpinned_gfns_in_posts()) == [5]
    assert not v.ppgtt.mms and not v.track.handlers and not bench.hv.vms[1].track.any()
    phys_fence = regs.fence_lo(v.part.fence_base + 1)
    assert bench.gpu.regs.get(phys_fence, 0) == 0 and bench.gpu.regs.get(phys_fence + 4, 0) == 0
    assert rd(bench, regs.fence_lo(1), 8) == 0
    assert rd(bench, regs.gt_imr(0)) == 0xFFFFFFFF                      # all registers
    assert rd(bench, pv(pvinfo.G2V_NOTIFY)) == 0
    assert rd(bench, regs.RCS_GPR0) == 0
    assert bench.ggtt_read(1, i) == gtt.encode(5, 3)        # the virtual GGTT stays, as in the kernel
    assert rd(bench, regs.RCS_GPR0, vgpu=2) == 0x77          # another vGPU is not touched
    assert bench.net.sent("SYNC", "mediator", "gpu")        # the reset is on the gpu when it answers


def test_device_model_reset_comes_from_the_launcher_or_the_hypervisor_never_a_guest(bench):
    """A VM that resets itself has its hypervisor (the device model) reset the vGPU; a guest
    cannot send VGPU_RESET, and asks its hypervisor with VM_RESET, for its own VM only."""
    from harness import add_peer
    info = bench.net.call("hypervisor", "mediator", "VGPU_RESET", None, 1)
    assert info["id"] == 1 and info["failsafe"] is None
    add_peer(bench.net, "guest1")
    with pytest.raises(GvtError) as e:
        bench.net.call("guest1", "hypervisor", "VGPU_RESET", None, 1)
    assert e.value.code == "EPERM"
    with pytest.raises(GvtError) as e:
        bench.net.call("guest1", "hypervisor", "VM_RESET", None, 2)
    assert e.value.code == "EPERM"
    bench.mediator.vgpus[1].enter_failsafe("guest_error")
    info = bench.net.call("guest1", "hypervisor", "VM_RESET", None, 1)
    assert info["failsafe"] is None and bench.mediator.vgpus[1].failsafe is None


# ---- 11. failsafe: default reads and writes ---------------------------------------------------------
def test_failsafe_mmio_is_plain_virtual_registers(bench):
    v = bench.mediator.vgpus[1]
    v.enter_failsafe("unsupported_guest")
    status = regs.ring("rcs", regs.RING_EXECLIST_STATUS)
    wr(bench, status, 0x1234)                                  # read-only bits do not apply
    assert rd(bench, status) == 0x1234
    mode = regs.ring("rcs", regs.RING_MODE)
    wr(bench, mode, 0x8000)                                    # no masking: stored as written
    assert rd(bench, mode) == 0x8000
    iir = regs.gt_iir(0)
    vregs(bench)[iir] = 0xFF
    wr(bench, iir, 0x0F)                                       # no write-1-to-clear
    assert rd(bench, iir) == 0x0F
    wr(bench, pv(pvinfo.MAGIC_OFF), 0)                         # no PV logic
    assert rd(bench, pv(pvinfo.MAGIC_OFF)) == 0
    wr(bench, regs.fence_lo(3), 5)                             # no fence push to the gpu
    assert not bench.net.sent("MMIO_WRITE", "mediator", "gpu")
    wr(bench, pv(pvinfo.RSV5), 1)
    assert v.failsafe == "unsupported_guest"                   # the first reason stays


# ---- 12. fence registers ----------------------------------------------------------------------------
def test_a_vgpus_fence_is_its_own_physical_fence(bench):
    v = bench.mediator.vgpus[2]
    pv_aware(bench, 2)
    wr(bench, regs.fence_lo(1), 0x0000_1234_0000_5678 | 1, 8, vgpu=2)
    assert rd(bench, regs.fence_lo(1), 8, vgpu=2) == 0x0000_1234_0000_5679
    phys = regs.fence_lo(v.part.fence_base + 1)
    assert bench.gpu.regs[phys] == 0x5679 and bench.gpu.regs[phys + 4] == 0x1234
    writes = [(e.payload["off"], e.payload["val"]) for e in bench.net.sent("MMIO_WRITE", "mediator", "gpu")]
    assert writes == [(phys, 0), (phys + 4, 0x1234), (phys, 0x5679)]   # low 0 first: off while it changes
    assert rd(bench, regs.fence_lo(1), 8, vgpu=1) == 0                  # vGPU 1's fence 1 is another


@pytest.mark.parametrize("aware", [True, False])
def test_a_fence_past_the_vgpus_count_is_refused(bench, aware):
    if aware:
        pv_aware(bench)
    past = regs.fence_lo(bench.mediator.vgpus[1].part.fence_num)
    res = bench.trap_write(1, past, 4, 1)
    assert res["n_errors"] == 1 and "EINVAL" in res["errors"][0]
    assert bench.mediator.vgpus[1].failsafe == (None if aware else "unsupported_guest")


def test_a_fence_read_past_the_count_is_refused(bench):
    pv_aware(bench)
    with pytest.raises(GvtError) as e:
        rd(bench, regs.fence_lo(4), 8)
    assert e.value.code == "EINVAL"


# ---- 13. force-wake is acknowledged ---------------------------------------------------------------
@pytest.mark.parametrize("req,ack", list(regs.FORCEWAKE_ACK.items()))
def test_force_wake_request_is_acknowledged(bench, req, ack):
    wr(bench, req, regs.masked_enable(regs.FORCEWAKE_KERNEL))
    assert rd(bench, ack) & regs.FORCEWAKE_KERNEL
    wr(bench, req, regs.masked_disable(regs.FORCEWAKE_KERNEL))
    assert not rd(bench, ack) & regs.FORCEWAKE_KERNEL
    wr(bench, req, regs.FORCEWAKE_KERNEL)                      # no mask bit: no change
    assert not rd(bench, ack) & regs.FORCEWAKE_KERNEL


# ---- 14. available() and allocate() agree ---------------------------------------------------------
def test_available_counts_only_what_allocate_can_place():
    a = GmAllocator(512 * MiB, gm_size=8 << 30)
    parts = [a.allocate("_8") for _ in range(3)]        # low GM [128, 320) MiB in 64 MiB shares
    a.release(parts[1])                                 # a 64 MiB hole, and [320, 512)
    # 256 MiB of low GM are free in total, but only one 128 MiB share fits in one piece
    assert a.available("_4") == 1
    a.allocate("_4")
    assert a.available("_4") == 0
    with pytest.raises(GvtError) as e:
        a.allocate("_4")
    assert e.value.code == "ENOSPC"
    assert a.available("_8") == 2                       # the hole and what is left after the _4
    a.allocate("_8"), a.allocate("_8")
    assert a.available("_8") == 0


@pytest.mark.parametrize("vtype", ["_8", "_4", "_2", "_1"])
def test_available_matches_what_can_be_created(vtype):
    a = GmAllocator(1024 * MiB)
    n = a.available(vtype)
    for _ in range(n):
        a.allocate(vtype)
    with pytest.raises(GvtError):
        a.allocate(vtype)
    assert n == {"_8": 7, "_4": 5, "_2": 2, "_1": 1}[vtype]
    assert a.available(vtype) == 0


# ---- a batch applies each rule as single writes would ------------------------------------------
@pytest.mark.parametrize("n", [8, 200])             # the small-batch path and the numpy path
def test_a_write_batch_ends_as_the_same_writes_one_by_one(n):
    """The batch path stores plain registers without the table lookups; interleaved with
    registers that have rules (W1C, masked, read-only, hooks, failsafe), a batch must end
    exactly as the same writes made one at a time."""
    special = [regs.IRQ_ISRS[0] + regs.IIR_OFF, regs.MASTER_IRQ, next(iter(regs.FORCEWAKE_ACK)),
               regs.ring("rcs", regs.RING_CSB_PTR), regs.ring("bcs", regs.RING_MI_MODE),
               regs.ring("vcs", regs.RING_EXECLIST_STATUS), pvinfo.BASE + pvinfo.CURSOR_X_HOT,
               regs.ring("vecs", regs.RING_MODE)]
    writes = []
    for i in range(n):
        off = special[i % len(special)] if i % 3 == 0 else regs.ring("rcs", regs.RING_GPR0) + 4 * (i % 7)
        writes.append((off, 4, (0x9E3779B9 * (i + 1)) & 0xFFFFFFFF))
    one_gen, batch_gen = started_bench(), started_bench()
    one, batch = next(one_gen), next(batch_gen)
    try:
        for b in (one, batch):
            pv_aware(b)
        for off, size, val in writes:        # the single-access path, without the batch's
            acts = mmio.emulate_write(one.mediator.vgpus[1], off, size, val, Ctx(0))
            if acts:                         # enabling execlists starts the vGPU's scheduling
                run_task(one, acts)
        res = batch.trap_writes(1, writes)
        assert res["n_errors"] == 0, res["errors"]
        assert vregs(batch) == vregs(one)
        assert batch.mediator.vgpus[1].failsafe == one.mediator.vgpus[1].failsafe
    finally:
        for g in (one_gen, batch_gen):
            g.close()
